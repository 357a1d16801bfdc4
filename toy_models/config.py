"""The toy decoder's config (toy_models/decoder.py is its model), on its own: the catalogue builds cases from
it in the parent (a pytest worker, the CLI), which then imports transformers' configuration code only, not
its modeling code (4.3 CPU-s per parent process measured: torch's DTensor, dynamo through transformers' integrations).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class ToyDecoderConfig(PretrainedConfig):
    model_type = "fsdp-toy-decoder"

    def __init__(
        self,
        vocab_size: int = 64,
        hidden_size: int = 32,
        intermediate_size: int = 48,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 32,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        # edge-case switches, each documented where it is used
        num_experts: int = 0,
        router_bias: bool = True,
        cos_sin_cache: bool = False,
        forgotten_buffer: bool = False,
        int_buffer: bool = False,
        scalar_buffer: bool = False,
        root_buffer: bool = False,
        shared_buffer: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.num_experts = num_experts
        self.router_bias = router_bias
        self.cos_sin_cache = cos_sin_cache
        self.forgotten_buffer = forgotten_buffer
        self.int_buffer = int_buffer
        self.scalar_buffer = scalar_buffer
        self.root_buffer = root_buffer
        self.shared_buffer = shared_buffer
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
