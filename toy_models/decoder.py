"""A tiny causal decoder whose config switches on one buffer/init edge case at a time.

Each switch re-creates a shape of model that broke (or could break) the
FSDP2 + cpu_ram_efficient_loading path. Every buffer feeds the logits, so a
wrong buffer on any rank shows up in the forward check as well as in the
tensor checks.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from toy_models.config import ToyDecoderConfig

try:
    from transformers import initialization as init
except ImportError:  # transformers 4.x: torch's initialisers, skipping loaded tensors as 5.x's `initialization` does
    from types import SimpleNamespace

    def _unless_loaded(fill):
        def apply(tensor, *args, **kwargs):
            if getattr(tensor, "_is_hf_initialized", False):
                return tensor
            with torch.no_grad():
                return fill(tensor, *args, **kwargs)

        return apply

    init = SimpleNamespace(
        normal_=_unless_loaded(nn.init.normal_),
        ones_=_unless_loaded(nn.init.ones_),
        zeros_=_unless_loaded(nn.init.zeros_),
        copy_=_unless_loaded(lambda tensor, value: tensor.copy_(value)),
    )


def rope_inv_freq(config: ToyDecoderConfig) -> torch.Tensor:
    dim = config.hidden_size // config.num_attention_heads
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def rope_cos_sin(config: ToyDecoderConfig) -> torch.Tensor:
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(positions, rope_inv_freq(config))
    return torch.stack((freqs.cos(), freqs.sin()))


def forgotten_slopes(config: ToyDecoderConfig) -> torch.Tensor:
    heads = config.num_attention_heads
    return torch.tensor([2.0 ** (-(i + 1) / heads) for i in range(heads)], dtype=torch.float32)


class ToyRMSNorm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + 1e-6)).to(x.dtype) * self.weight


class ToyRotaryEmbedding(nn.Module):
    """Non-persistent `inv_freq`/`original_inv_freq` kept in fp32, like Llama's.

    The name matches transformers' generic `_init_weights` branch for rotary
    embeddings; we recompute it ourselves too, as models do.
    """

    def __init__(self, config: ToyDecoderConfig):
        super().__init__()
        self.config = config
        inv_freq = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        if config.cos_sin_cache:
            # precomputed cache: computed here, recomputed by _init_weights
            self.register_buffer("cos_sin", rope_cos_sin(config), persistent=False)

    def forward(self, seq_len: int):
        if self.config.cos_sin_cache:
            cos, sin = self.cos_sin[0, :seq_len], self.cos_sin[1, :seq_len]
        else:
            positions = torch.arange(seq_len, dtype=torch.float32, device=self.inv_freq.device)
            freqs = torch.outer(positions, self.inv_freq.float() + 0 * self.original_inv_freq.float())
            cos, sin = freqs.cos(), freqs.sin()
        return cos, sin


def apply_rope(x, cos, sin):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class ToyAttention(nn.Module):
    def __init__(self, config: ToyDecoderConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        if config.forgotten_buffer:
            # ALiBi-style slopes that _init_weights does NOT recompute: only
            # rank 0 (which builds the model for real) holds the true value.
            self.register_buffer("alibi_slopes", forgotten_slopes(config), persistent=False)

    def forward(self, x, cos, sin, mask):
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scores = (q @ k.transpose(-1, -2)) / (h // self.heads) ** 0.5
        if hasattr(self, "alibi_slopes"):
            dist = torch.arange(t, device=x.device)[None, :] - torch.arange(t, device=x.device)[:, None]
            scores = scores + self.alibi_slopes.to(scores.dtype)[:, None, None] * dist.to(scores.dtype)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        out = scores.softmax(-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h))


class ToyRouter(nn.Module):
    """DeepSeek-V3's router: a persistent fp32 `e_score_correction_bias` buffer."""

    def __init__(self, config: ToyDecoderConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.router_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, x):
        scores = (x.float() @ self.weight.float().t()).sigmoid()
        if hasattr(self, "e_score_correction_bias"):
            scores = scores + self.e_score_correction_bias.float()
        return scores.softmax(-1)


class ToyExperts(nn.Module):
    """Experts stored as 3-D parameters (one tensor for all experts), like recent MoE code."""

    def __init__(self, config: ToyDecoderConfig):
        super().__init__()
        self.up = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, config.intermediate_size))
        self.down = nn.Parameter(torch.empty(config.num_experts, config.intermediate_size, config.hidden_size))

    def forward(self, x, weights):
        hidden = torch.einsum("bth,ehi->btei", x, self.up).relu()
        out = torch.einsum("btei,eih->bteh", hidden, self.down)
        return (out * weights.to(out.dtype)[..., None]).sum(-2)


class ToyMLP(nn.Module):
    def __init__(self, config: ToyDecoderConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        if config.scalar_buffer:
            # 0-dim persistent buffer deep in the tree
            self.register_buffer("residual_scale", torch.tensor(1.0))

    def forward(self, x):
        out = self.down(self.up(x).relu())
        if hasattr(self, "residual_scale"):
            out = out * self.residual_scale.to(out.dtype)
        return out


class ToyLayer(nn.Module):
    def __init__(self, config: ToyDecoderConfig):
        super().__init__()
        self.input_norm = ToyRMSNorm(config.hidden_size)
        self.attn = ToyAttention(config)
        self.post_norm = ToyRMSNorm(config.hidden_size)
        if config.num_experts:
            self.router = ToyRouter(config)
            self.experts = ToyExperts(config)
        else:
            self.mlp = ToyMLP(config)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.input_norm(x), cos, sin, mask)
        h = self.post_norm(x)
        if hasattr(self, "router"):
            return x + self.experts(h, self.router(h))
        return x + self.mlp(h)


class ToyPreTrainedModel(PreTrainedModel):
    config_class = ToyDecoderConfig
    config: ToyDecoderConfig
    base_model_prefix = "model"
    _no_split_modules = ["ToyLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ToyRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, ToyRotaryEmbedding):
            init.copy_(module.inv_freq, rope_inv_freq(self.config))
            init.copy_(module.original_inv_freq, rope_inv_freq(self.config))
            if self.config.cos_sin_cache:
                init.copy_(module.cos_sin, rope_cos_sin(self.config))
        elif isinstance(module, ToyRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if hasattr(module, "e_score_correction_bias"):
                init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, ToyExperts):
            init.normal_(module.up, mean=0.0, std=std)
            init.normal_(module.down, mean=0.0, std=std)
        elif isinstance(module, ToyMLP) and hasattr(module, "residual_scale"):
            init.ones_(module.residual_scale)
        elif isinstance(module, ToyModel):
            if hasattr(module, "token_map"):
                init.copy_(module.token_map, torch.arange(self.config.vocab_size))
            if hasattr(module, "causal_mask"):
                init.copy_(module.causal_mask, causal_mask(self.config))
        elif isinstance(module, ToyForCausalLM) and hasattr(module, "logit_bias"):
            init.zeros_(module.logit_bias)
        # ToyAttention.alibi_slopes is deliberately not recomputed (forgotten_buffer)


def causal_mask(config: ToyDecoderConfig) -> torch.Tensor:
    n = config.max_position_embeddings
    return torch.ones(n, n, dtype=torch.bool).tril()


class ToyModel(ToyPreTrainedModel):
    def __init__(self, config: ToyDecoderConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ToyLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = ToyRMSNorm(config.hidden_size)
        self.rotary_emb = ToyRotaryEmbedding(config)
        if config.int_buffer:
            # persistent int64 buffer: a token permutation whose checkpoint value is not its init
            self.register_buffer("token_map", torch.arange(config.vocab_size))
        if config.shared_buffer:
            # one bool tensor registered under two modules (non-persistent)
            mask = causal_mask(config)
            self.register_buffer("causal_mask", mask, persistent=False)
            self.layers[0].register_buffer("causal_mask", mask, persistent=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids):
        if hasattr(self, "token_map"):
            input_ids = self.token_map[input_ids]
        t = input_ids.shape[1]
        cos, sin = self.rotary_emb(t)
        if hasattr(self, "causal_mask"):
            mask = self.causal_mask[:t, :t] & self.layers[0].causal_mask[:t, :t]
        else:
            mask = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class ToyForCausalLM(ToyPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ToyDecoderConfig):
        super().__init__(config)
        self.model = ToyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.root_buffer:
            # persistent buffer on the root module itself
            self.register_buffer("logit_bias", torch.zeros(config.vocab_size))
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, **kwargs):
        logits = self.lm_head(self.model(input_ids))
        if hasattr(self, "logit_bias"):
            logits = logits + self.logit_bias.to(logits.dtype)
        return CausalLMOutput(logits=logits)
