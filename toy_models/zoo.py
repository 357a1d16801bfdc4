"""The toy cases: one edge case of the loading path each, named after what it guards."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from fsdp_load_checks.records import BIG, PERSISTENT_BUFFER, Case
from fsdp_load_checks.records.case import (
    CONVERTED_ON_LOAD,
    FORGOTTEN_BUFFER,
    FORGOTTEN_FLOAT_BUFFER,
    SHARED_NON_PERSISTENT,
)
from toy_models.config import ToyDecoderConfig

TOY = ("toy_models.register",)
# ToyAttention.alibi_slopes in every layer of the default config: the buffer ToyPreTrainedModel._init_weights forgets
ALIBI = tuple(f"model.layers.{i}.attn.alibi_slopes" for i in range(ToyDecoderConfig().num_hidden_layers))


def toy(name: str, guards: str, dtype: str = "float32", *, persistent: bool = False, **switches) -> Case:
    case = Case(name, guards, partial(ToyDecoderConfig, **switches), imports=TOY, dtype=dtype)
    return case.with_tags(PERSISTENT_BUFFER) if persistent else case


# the memory size class: one shape for both dtypes
BIG_LLAMA = dict(vocab_size=16384, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8)
# the memory size class for a MoE: a real Qwen3-MoE, 16 experts top-2 (~236 MiB fp32); save_pretrained writes one
# tensor per expert, which from_pretrained stacks into 3-D parameters
BIG_QWEN3_MOE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=16, num_experts_per_tok=2,
                     moe_intermediate_size=512, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2)


def _transformers_config(cls_name: str, **kw):
    import transformers

    return getattr(transformers, cls_name)(**kw)

TOY_CASES = [
    toy("llama-rope", "non-persistent RoPE inv_freq/original_inv_freq must be recomputed on every rank (untied)"),
    toy(
        "deepseek-router-bias",
        "persistent fp32 e_score_correction_bias (DeepSeek-V3 router) must arrive from rank 0 (accelerate #3898)",
        persistent=True,
        num_experts=4,
    ),
    toy("moe-3d-experts", "MoE experts stored as 3-D parameters shard and gather intact", num_experts=4, router_bias=False),
    toy("int-buffer", "persistent int64 buffer (a token permutation) must arrive from rank 0", persistent=True, int_buffer=True),
    toy("scalar-buffer", "0-dim persistent buffer deep in the tree must arrive from rank 0", persistent=True, scalar_buffer=True),
    toy("root-buffer", "persistent buffer on the root module must arrive from rank 0", persistent=True, root_buffer=True),
    toy("cos-sin-cache", "non-persistent cos/sin cache built in __init__ and recomputed in _init_weights", cos_sin_cache=True),
    toy(
        "forgotten-buffer",
        "non-persistent buffer _init_weights does not recompute: other ranks keep a placeholder unless rank 0's is sent",
        forgotten_buffer=True,
    ).with_tags(tensors={FORGOTTEN_BUFFER: ALIBI, FORGOTTEN_FLOAT_BUFFER: ALIBI}),
    toy("shared-buffer", "one buffer tensor registered under two modules", shared_buffer=True).with_tags(
        SHARED_NON_PERSISTENT
    ),
    toy("fp32-rope-in-bf16", "fp32 RoPE buffers inside a bf16 model keep fp32 (the NaN-logits dtype case)", "bfloat16", cos_sin_cache=True),
    toy("tied-embeddings", "tied input/output embeddings stay tied and equal after sharding", tie_word_embeddings=True),
    Case(
        "missing-head",
        "a key missing from the checkpoint is initialised by rank 0; every rank must end with rank 0's values",
        partial(ToyDecoderConfig),
        imports=TOY,
        drop_keys=("lm_head.weight",),
    ),
    Case(
        "unexpected-keys",
        "unexpected extra keys in the checkpoint are ignored the same way on every rank",
        partial(ToyDecoderConfig),
        imports=TOY,
        extra_keys=("model.legacy_proj.weight", "model.rotary_emb.inv_freq"),
    ),
    toy(
        "uneven-shards",
        "parameter dims not divisible by the world size (uneven FSDP shards)",
        vocab_size=67,
        hidden_size=40,
        intermediate_size=37,
    ),
    toy("bf16-checkpoint", "bf16 checkpoint loads bit-exact", "bfloat16"),
    toy("fp16-checkpoint", "fp16 checkpoint loads bit-exact", "float16"),
    toy(
        "deepseek-bf16",
        "DeepSeek-style router bias in a bf16 model: buffer dtype and value from rank 0",
        "bfloat16",
        persistent=True,
        num_experts=4,
    ),
    toy(
        "big-llama",
        "size class for the memory check (~290 MiB fp32): ranks that only receive must commit ~0x the model while "
        "loading (the zeros_like-era OOM regression committed 1x on every rank)",
        **BIG_LLAMA,
    ).with_tags(BIG),
    toy(
        "big-llama-bf16",
        "the memory size class in bf16 (~145 MiB): under mixed precision, preparation must not upcast a full fp32 "
        "copy of the model on ranks that only receive (accelerate 1.14+)",
        "bfloat16",
        **BIG_LLAMA,
    ).with_tags(BIG),
    Case(
        "big-qwen3-moe",
        "the memory size class for a MoE (~236 MiB fp32, real Qwen3-MoE): ranks that only receive must not commit "
        "the experts stacked from the checkpoint's per-expert tensors (transformers issue 43749)",
        partial(_transformers_config, "Qwen3MoeConfig", **BIG_QWEN3_MOE),
    ).with_tags(BIG, CONVERTED_ON_LOAD),
]
# the big cases judge memory; saving and training them would repeat their toy twins' checks at 100x the cost
TOY_CASES = [replace(c, after_loading=False) if BIG in c.tags else c for c in TOY_CASES]
