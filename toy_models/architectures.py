"""Real transformers architectures, each built from a tiny config in code.

Every case is a real architecture shipped inside the installed transformers,
loaded through AutoModelForCausalLM, as its base model through AutoModel
(`arch-*-base`, `Case.model_class`), as another class (masked LM, seq2seq,
vision-language: `arch-bert-mlm`, `arch-t5`, `arch-bart`, `arch-qwen2-vl`, ...),
or as a classifier on a checkpoint
saved without the head (`arch-*-seq-cls`, `Case.checkpoint_class`); nothing
is ever downloaded. Configs are
tiny (hidden 32, 2 layers, vocab 128, 4 experts top-2) so the whole sweep
stays fast. Every rank imports this module, so top-level imports stay cheap:
the config class is looked up on `transformers` only when the case's config
is built.

`SKIPPED_ARCHS` names every architecture of interest that is not a case,
with the reason, so none is silently dropped.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from fsdp_load_checks.records import PERSISTENT_BUFFER, Case
from fsdp_load_checks.records.case import (
    MISSING_PARAMETERS,
    ROOT_NON_PERSISTENT,
    ROOT_NON_PERSISTENT_OUTPUT_UNCHANGED,
    ROOT_NON_PERSISTENT_UNREAD,
    TIED_BEYOND_EMBEDDINGS,
)

VOCAB = 128


def _config(cls_name: str, **kw):
    import transformers

    return getattr(transformers, cls_name)(**kw)


# the decoder shape most Llama-family configs share
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Sparse MoE blocks: 4 experts, top-2.
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# DeepSeek-style MLA attention + grouped router with a persistent e_score_correction_bias.
MLA = dict(
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    num_key_value_heads=4,
)
DEEPSEEK_MOE = dict(
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
)


def _with(base: dict, **kw) -> dict:
    return {**base, **kw}


# model_type -> (config class, kwargs, guards, has a persistent buffer)
_SPECS: dict[str, tuple[str, dict, str, bool]] = {
    "llama": ("LlamaConfig", DECODER, "non-persistent RoPE inv_freq/original_inv_freq, GQA, untied head", False),
    "mistral": ("MistralConfig", _with(DECODER, sliding_window=4), "non-persistent RoPE inv_freq with sliding-window attention", False),
    "mixtral": (
        "MixtralConfig",
        _with(DECODER, num_local_experts=4, num_experts_per_tok=2),
        "sparse MoE with experts stored as fused 3-D parameters",
        False,
    ),
    "qwen2": ("Qwen2Config", DECODER, "q/k/v projection biases + non-persistent RoPE", False),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        _with(DECODER, **MOE, shared_expert_intermediate_size=32, decoder_sparse_step=1),
        "MoE with gated shared expert (shared_expert_gate) and 3-D experts",
        False,
    ),
    "qwen3": ("Qwen3Config", _with(DECODER, head_dim=8), "q/k RMSNorm weights per head + non-persistent RoPE", False),
    "qwen3_moe": ("Qwen3MoeConfig", _with(DECODER, **MOE, head_dim=8), "MoE router + 3-D experts with q/k norm", False),
    "deepseek_v3": (
        "DeepseekV3Config",
        _with(DECODER, **MLA, **DEEPSEEK_MOE),
        "persistent e_score_correction_bias router buffer, MLA low-rank attention, dense first layer",
        True,
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        _with(DECODER, **MLA, **DEEPSEEK_MOE, topk_method="greedy"),
        "MLA low-rank attention + greedy-routed MoE with shared experts (no router bias buffer)",
        False,
    ),
    "gemma": ("GemmaConfig", _with(DECODER, head_dim=8), "tied embeddings with sqrt(hidden) embedding scale", False),
    "gemma2": (
        "Gemma2Config",
        _with(DECODER, head_dim=8, sliding_window=4),
        "tied embeddings, alternating sliding/full attention, logit softcapping",
        False,
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        _with(DECODER, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
        "two RoPE buffer sets (local and global rotary embeddings) + scaled word embedding buffer",
        False,
    ),
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
        "learned absolute positions, Conv1D weights, tied embeddings",
        False,
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        _with(DECODER, num_key_value_heads=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
        "partial rotary (rotary_pct) inv_freq + fused qkv",
        False,
    ),
    "phi": ("PhiConfig", _with(DECODER, num_key_value_heads=4), "partial rotary factor, dense biases, final layernorm + biased lm_head", False),
    "phi3": ("Phi3Config", _with(DECODER, sliding_window=None), "fused qkv_proj and gate_up_proj + non-persistent RoPE", False),
    "olmo": ("OlmoConfig", DECODER, "non-parametric LayerNorm (no norm weights at all)", False),
    "olmo2": ("Olmo2Config", DECODER, "post-norm with q/k RMSNorm over all heads", False),
    "starcoder2": ("Starcoder2Config", _with(DECODER, sliding_window=None), "LayerNorm with biases + biased MLP (c_fc/c_proj)", False),
    "stablelm": ("StableLmConfig", _with(DECODER, num_key_value_heads=4), "partial rotary factor with LayerNorm", False),
    "granite": ("GraniteConfig", DECODER, "embedding/residual/attention/logits multipliers on a Llama body", False),
    "granitemoe": (
        "GraniteMoeConfig",
        _with(DECODER, num_local_experts=4, num_experts_per_tok=2),
        "MoE with ParallelExperts 3-D weights and top-k gating",
        False,
    ),
    "cohere": ("CohereConfig", DECODER, "tied embeddings, interleaved RoPE, parallel attention/MLP", False),
    "falcon": (
        "FalconConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "multi-query fused qkv with parallel attention and tied embeddings",
        False,
    ),
    "opt": (
        "OPTConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        ),
        "learned absolute positions with an offset of 2 + tied embeddings",
        False,
    ),
    "bloom": (
        "BloomConfig",
        dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=3),
        "ALiBi attention bias computed on the fly (no position buffers) + embedding LayerNorm",
        False,
    ),
    "gptj": (
        "GPTJConfig",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, bos_token_id=1, eos_token_id=2),
        "non-persistent sin/cos position buffer (embed_positions) built in __init__",
        False,
    ),
    "codegen": (
        "CodeGenConfig",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, n_ctx=64, bos_token_id=1, eos_token_id=2),
        "non-persistent sin/cos position buffer (embed_positions) + fused qkv with mp_num split",
        False,
    ),
    "smollm3": ("SmolLM3Config", DECODER, "NoPE layers (no_rope_layers) interleaved with RoPE layers, tied embeddings", False),
    "glm": ("GlmConfig", _with(DECODER, head_dim=8), "partial rotary with interleaved RoPE, fused gate_up_proj", False),
    "glm4": ("Glm4Config", _with(DECODER, head_dim=8), "post-attention and post-MLP sandwich norms + partial rotary", False),
    "glm4_moe": (
        "Glm4MoeConfig",
        _with(DECODER, head_dim=8, **DEEPSEEK_MOE),
        "persistent e_score_correction_bias router buffer with a dense first layer",
        True,
    ),
    "ernie4_5": ("Ernie4_5Config", _with(DECODER, head_dim=8), "interleaved RoPE with tied embeddings", False),
    "helium": ("HeliumConfig", _with(DECODER, head_dim=8), "Llama-like body with its own RMSNorm", False),
}


# Beyond the required list: architectures that add something new to the loading path.
_EXTRA_SPECS: dict[str, tuple[str, dict, str, bool]] = {
    "gemma4_text": (
        "Gemma4TextConfig",
        _with(
            DECODER,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
            num_kv_shared_layers=0,
            global_head_dim=16,
        ),
        "persistent per-layer layer_scalar buffers + per-layer input embeddings + two RoPE buffer sets",
        True,
    ),
    "lfm2_moe": (
        "Lfm2MoeConfig",
        _with(DECODER, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, num_dense_layers=1, layer_types=["conv", "full_attention"]),
        "persistent expert_bias router buffer + short-conv layers",
        True,
    ),
    "minimax": (
        "MiniMaxConfig",
        _with(DECODER, head_dim=8, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention", "linear_attention"]),
        "persistent lightning-attention slope_rate/query_decay/key_decay buffers",
        True,
    ),
    "minimax_m2": (
        "MiniMaxM2Config",
        _with(DECODER, head_dim=8, num_local_experts=4, num_experts_per_tok=2),
        "persistent e_score_correction_bias on every sparse MoE block",
        True,
    ),
    "apertus": ("ApertusConfig", _with(DECODER, head_dim=8), "persistent xIELU activation beta/eps buffers", True),
    "dots1": (
        "Dots1Config",
        _with(DECODER, head_dim=8, **DEEPSEEK_MOE),
        "persistent e_score_correction_bias router buffer (DeepSeek-style router on a Qwen3 body)",
        True,
    ),
    "glm4_moe_lite": (
        "Glm4MoeLiteConfig",
        _with(DECODER, **MLA, **DEEPSEEK_MOE),
        "persistent e_score_correction_bias router buffer with MLA attention",
        True,
    ),
    "deepseek_v32": (
        "DeepseekV32Config",
        _with(DECODER, **MLA, **DEEPSEEK_MOE),
        "persistent e_score_correction_bias + sparse-attention indexer weights",
        True,
    ),
    "longcat_flash": (
        "LongcatFlashConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            ffn_hidden_size=64,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            head_dim=8,
            v_head_dim=8,
            qk_head_dim=16,
            moe_topk=2,
            n_routed_experts=4,
            zero_expert_num=2,
            expert_ffn_hidden_size=16,
        ),
        "persistent router e_score_correction_bias with zero (identity) experts and two attention sublayers per layer",
        True,
    ),
    "kimi_linear": (
        "KimiLinearConfig",
        _with(
            DECODER,
            **MLA,
            n_shared_experts=1,
            moe_intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            layer_types=["linear_attention", "full_attention"],
            mlp_layer_types=["dense", "sparse"],
            linear_head_dim=8,
            linear_num_heads=4,
        ),
        "persistent e_score_correction_bias + KDA linear attention with NoPE MLA layers",
        True,
    ),
    "gemma3n_text": (
        "Gemma3nTextConfig",
        _with(
            DECODER,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
            num_kv_shared_layers=0,
            laurel_rank=4,
            activation_sparsity_pattern=[0.0, 0.0],
            intermediate_size=[64, 64],
        ),
        "many non-persistent scale buffers (per_layer_projection_scale, altup router_input_scale, embed_scale)",
        False,
    ),
    "recurrent_gemma": (
        "RecurrentGemmaConfig",
        dict(
            num_hidden_layers=2,
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            lru_width=32,
            attention_window_size=8,
            block_types=["recurrent", "attention"],
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "non-persistent model.normalizer buffer + RG-LRU recurrent block",
        False,
    ),
    "falcon_h1": (
        "FalconH1Config",
        _with(DECODER, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8),
        "non-persistent per-layer mamba mup_vector buffers (muP multipliers)",
        False,
    ),
    "xglm": (
        "XGLMConfig",
        dict(vocab_size=VOCAB, d_model=32, ffn_dim=64, num_layers=2, attention_heads=4, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        "non-persistent sinusoidal position table (embed_positions.weights)",
        False,
    ),
    "ctrl": (
        "CTRLConfig",
        dict(vocab_size=VOCAB, n_positions=64, n_embd=32, dff=64, n_layer=2, n_head=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "non-persistent sinusoidal pos_encoding buffer",
        False,
    ),
    "gpt_bigcode": (
        "GPTBigCodeConfig",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64, bos_token_id=1, eos_token_id=2),
        "non-persistent boolean causal-mask buffer (transformer.bias) + multi-query attention",
        False,
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        dict(
            vocab_size=VOCAB,
            max_position_embeddings=64,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "non-persistent per-layer causal-mask bias buffers (global and local windows)",
        False,
    ),
    "openai-gpt": (
        "OpenAIGPTConfig",
        dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4),
        "non-persistent position_ids and per-layer attn.bias causal-mask buffers",
        False,
    ),
    "mpt": (
        "MptConfig",
        dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "ALiBi computed on the fly, bias-free LayerNorm",
        False,
    ),
    "biogpt": (
        "BioGptConfig",
        dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        "learned positions with offset and scaled embeddings",
        False,
    ),
    "dbrx": (
        "DbrxConfig",
        dict(
            d_model=32,
            n_heads=4,
            n_layers=2,
            max_seq_len=64,
            vocab_size=VOCAB,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "nested attn/ffn sub-configs + fused Wqkv and 3-D expert weights",
        False,
    ),
    "gpt_oss": (
        "GptOssConfig",
        _with(
            DECODER,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 8,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "rope_theta": 150000.0,
            },
        ),
        "attention-sink parameters + biased 3-D expert weights + YaRN inv_freq/attention_factor",
        False,
    ),
    "llama4_text": (
        "Llama4TextConfig",
        _with(DECODER, head_dim=8, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=64, intermediate_size=32),
        "MoE with a shared expert + interleaved NoPE layers",
        False,
    ),
    "olmoe": ("OlmoeConfig", _with(DECODER, **MOE), "MoE with q/k norm over all heads", False),
    "phimoe": (
        "PhimoeConfig",
        _with(DECODER, num_local_experts=4, num_experts_per_tok=2),
        "sparsemixer MoE routing with LayerNorm + biased lm_head",
        False,
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        _with(
            DECODER,
            head_dim=8,
            **MOE,
            shared_expert_intermediate_size=16,
            layer_types=["linear_attention", "full_attention"],
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
        ),
        "gated delta-net linear attention (conv1d, A_log, dt_bias params) + gated full attention + MoE",
        False,
    ),
    "jamba": (
        "JambaConfig",
        _with(
            DECODER,
            num_experts=4,
            num_experts_per_tok=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            mamba_d_state=4,
            mamba_dt_rank=4,
            use_mamba_kernels=False,  # transformers 4.57 refuses the CPU forward without the CUDA kernels otherwise
        ),
        "mamba + attention hybrid with MoE (no positional buffers at all)",
        False,
    ),
    "mamba": (
        "MambaConfig",
        dict(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "pure SSM: A_log/D parameters and depthwise conv1d, no attention",
        False,
    ),
    "lfm2": (
        "Lfm2Config",
        _with(DECODER, layer_types=["conv", "full_attention"]),
        "short-conv (depthwise conv1d) layers mixed with attention",
        False,
    ),
    "zamba": (
        "ZambaConfig",
        _with(
            DECODER,
            num_hidden_layers=3,  # with 2 layers the shared block has nothing to tie to and the model refuses to build
            attention_hidden_size=64,
            attention_head_dim=16,
            n_mamba_heads=2,
            mamba_d_state=8,
            mamba_dt_rank=4,
            layers_block_type=["hybrid", "mamba", "hybrid"],
            use_mamba_kernels=False,  # transformers < 5.20 refuses to run without the CUDA kernels otherwise
        ),
        "one shared transformer block tied (by regex tie keys) into every hybrid layer + mamba layers",
        False,
    ),
    "nemotron": ("NemotronConfig", _with(DECODER, head_dim=8), "LayerNorm1P (weight + 1) with partial rotary", False),
}

# Base models (no head), loaded with AutoModel as embedding models, classifiers and custom heads load them: the
# forward check compares last_hidden_state, and the model itself is the top-level module, so an `_init_weights`
# branch for the base class runs on the root (which ranks 1..N mark initialised). model_type -> (config class,
# kwargs, guards, the root's non-persistent buffers that branch recomputes: found by a static scan of 5.24.0).
BASE_MODEL_CLASS = "AutoModel"
# XLM and FlauBERT (FlaubertConfig extends XLMConfig): the same tiny shape and special-token ids
_XLM = dict(vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=4, max_position_embeddings=64, pad_index=0, bos_index=1,
            eos_index=2, unk_index=3, mask_index=4)
_BASE_SPECS: dict[str, tuple[str, dict, str, tuple[str, ...]]] = {
    "llama": (
        "LlamaConfig",
        DECODER,
        "a decoder loaded as its base model (LlamaModel, AutoModel): no head, last_hidden_state compared",
        (),
    ),
    "bert": (
        "BertConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
        "an encoder as its own class (BertModel, AutoModel): non-persistent position_ids/token_type_ids, pooler",
        (),
    ),
    "ctrl": (
        "CTRLConfig",
        _EXTRA_SPECS["ctrl"][1],
        "CTRLModel's _init_weights branch for the model itself recomputes its sinusoidal pos_encoding buffer",
        ("pos_encoding",),
    ),
    "openai-gpt": (
        "OpenAIGPTConfig",
        _EXTRA_SPECS["openai-gpt"][1],
        "OpenAIGPTModel's _init_weights branch for the model itself recomputes its int64 position_ids buffer",
        ("position_ids",),
    ),
    "gpt_bigcode": (
        "GPTBigCodeConfig",
        _EXTRA_SPECS["gpt_bigcode"][1],
        "GPTBigCodeModel's branch for the model itself recomputes its boolean causal mask `bias` (its forward no "
        "longer reads it)",
        ("bias",),
    ),
    "recurrent_gemma": (
        "RecurrentGemmaConfig",
        _EXTRA_SPECS["recurrent_gemma"][1],
        "RecurrentGemmaModel's branch for the model itself recomputes its `normalizer` (sqrt(hidden), bf16)",
        ("normalizer",),
    ),
    "gemma3n_text": (
        "Gemma3nTextConfig",
        _EXTRA_SPECS["gemma3n_text"][1],
        "Gemma3nTextModel's branch for the model itself recomputes per_layer_projection_scale and "
        "per_layer_input_scale",
        ("per_layer_projection_scale", "per_layer_input_scale"),
    ),
    "xlm": (
        "XLMConfig",
        _XLM,
        "XLMModel's branch for the model itself recomputes its int64 position_ids buffer",
        ("position_ids",),
    ),
    "flaubert": (
        "FlaubertConfig",
        _XLM,
        "FlaubertModel's branch for the model itself recomputes its int64 position_ids buffer",
        ("position_ids",),
    ),
    "layoutlmv3": (
        "LayoutLMv3Config",
        dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, max_2d_position_embeddings=64, coordinate_size=4, shape_size=8,
             input_size=28, patch_size=14, rel_pos_bins=8, max_rel_pos=16, rel_2d_pos_bins=8, max_rel_2d_pos=16,
             pad_token_id=0),
        "LayoutLMv3Model's branch for the model itself recomputes its `visual_bbox` (read only with an image: a "
        "text-only forward does not)",
        ("visual_bbox",),
    ),
}

# base models whose root buffer leaves the checks' forward output unchanged: a text-only forward does not read it
# (rank 1's zeros show in `buffers` only), or reads it through a zero-initialised weight (Gemma3n's altup
# correct_output_scale: the gradients differ)
_ROOT_BUFFER_UNREAD = {"gpt_bigcode", "layoutlmv3"}
_ROOT_BUFFER_OUTPUT_UNCHANGED = {"gemma3n_text", *_ROOT_BUFFER_UNREAD}

# tiny vision towers for the vision-language cases (28x28 images, 14x14 patches)
_CLIP_NO_PROJ = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                     patch_size=14)
_CLIP = _with(_CLIP_NO_PROJ, projection_dim=32)
_SIGLIP = _CLIP_NO_PROJ

# Other model classes than causal LMs, each saved and loaded as its own class (`Case.model_class`): the forward
# feeds input_ids (and the same ids as decoder_input_ids to an encoder-decoder) and compares the logits.
# case name suffix -> (model_type, config class, kwargs, the class, guards, has a persistent buffer, the parameter
# tied beyond the embeddings as torch's FSDP2 names it (TIED_BEYOND_EMBEDDINGS))
_CLASS_SPECS: dict[str, tuple[str, str, dict, str, str, bool, str]] = {
    "bert-mlm": (
        "bert",
        "BertConfig",
        _BASE_SPECS["bert"][1],
        "AutoModelForMaskedLM",
        "an encoder MLM (BertForMaskedLM): the decoder tied to the word embeddings across modules, its bias to "
        "cls.predictions.bias",
        False,
        "None",  # the decoder bias is cls.predictions.bias: torch's check finds no name for it
    ),
    "t5": (
        "t5",
        "T5Config",
        dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
             pad_token_id=0),
        "AutoModelForSeq2SeqLM",
        "a seq2seq model (T5ForConditionalGeneration): encoder, decoder and lm_head tied to one shared embedding, "
        "relative attention bias",
        False,
        "shared.weight",
    ),
    "bart": (
        "bart",
        "BartConfig",
        dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
             pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
        "AutoModelForSeq2SeqLM",
        "a seq2seq model (BartForConditionalGeneration): lm_head tied to the shared embedding, persistent "
        "final_logits_bias buffer",
        True,
        "",
    ),
    **{
        name: (model_type, cls_name, kw, "AutoModelForImageTextToText",
               f"a vision-language model ({cls_name.replace('Config', 'ForConditionalGeneration')}), text-only pass: "
               f"{what}", False, "")
        for name, (model_type, cls_name, kw, what) in {
            "llava": ("llava", "LlavaConfig", dict(
                text_config=dict(model_type="llama", **DECODER), vision_config=dict(model_type="clip_vision_model", **_CLIP),
                image_token_index=120, vision_feature_layer=-1), "a CLIP tower and a projector beside a Llama"),
            "idefics3": ("idefics3", "Idefics3Config", dict(
                text_config=dict(model_type="llama", **DECODER), vision_config=_SIGLIP, image_token_id=120, scale_factor=2),
                "a SigLIP-style tower and a pixel-shuffle connector beside a Llama"),
            "mistral3": ("mistral3", "Mistral3Config", dict(
                text_config=dict(model_type="mistral", head_dim=8, **DECODER),
                vision_config=dict(model_type="pixtral", head_dim=8, **_CLIP_NO_PROJ), image_token_index=120,
                spatial_merge_size=2, vision_feature_layer=-1), "a Pixtral tower and a patch merger beside a Mistral"),
            "gemma3": ("gemma3", "Gemma3Config", dict(
                text_config=dict(model_type="gemma3_text", head_dim=8, **DECODER),
                vision_config=dict(model_type="siglip_vision_model", **_SIGLIP), mm_tokens_per_image=4,
                image_token_index=120, boi_token_index=121, eoi_token_index=122),
                "a SigLIP tower beside Gemma 3 (sliding and full attention, tied head)"),
        }.items()
    },
    # classifier checkpoints loaded as themselves (a fine-tuned classifier, as evaluation and further training load it)
    "bert-seq-cls-ckpt": (
        "bert",
        "BertConfig",
        _with(_BASE_SPECS["bert"][1], num_labels=3),
        "AutoModelForSequenceClassification",
        "a classifier checkpoint loaded as itself (BertForSequenceClassification, its classifier saved): pooler and "
        "head arrive from rank 0 like every other parameter",
        False,
        "",
    ),
    "llama-seq-cls-ckpt": (
        "llama",
        "LlamaConfig",
        _with(DECODER, num_labels=3),
        "AutoModelForSequenceClassification",
        "a decoder classifier checkpoint loaded as itself (LlamaForSequenceClassification, its score head saved): "
        "logits pooled at the last non-pad token",
        False,
        "",
    ),
    "qwen2-vl": (
        "qwen2_vl",
        "Qwen2VLConfig",
        dict(
            text_config=_with(DECODER, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=120, video_token_id=121, vision_start_token_id=122, bos_token_id=1, eos_token_id=2,
        ),
        "AutoModelForImageTextToText",
        "a vision-language model (Qwen2VLForConditionalGeneration), text-only pass: the vision tower loaded and "
        "sharded beside the language model, M-RoPE",
        False,
        "",
    ),
}

# Heads loaded on a checkpoint saved without them, as fine-tuning starts: the head's parameters are missing from
# the checkpoint (rank 0 initialises them, every rank must end with rank 0's values; ranks 1..N keep them on meta
# until the broadcast). case suffix -> (model_type, config class, kwargs, the class the checkpoint is saved from,
# the class it is loaded with, guards, the missing parameters).
_HEAD_SPECS: dict[str, tuple[str, str, dict, str, str, str, tuple[str, ...]]] = {
    "bert-seq-cls": (
        "bert",
        "BertConfig",
        _with(_BASE_SPECS["bert"][1], num_labels=3),
        "AutoModel",
        "AutoModelForSequenceClassification",
        "a classifier on an encoder checkpoint (BertForSequenceClassification from a BertModel save): "
        "classifier weight and bias missing",
        ("classifier.weight", "classifier.bias"),
    ),
    "llama-seq-cls": (
        "llama",
        "LlamaConfig",
        _with(DECODER, num_labels=3),
        "AutoModelForCausalLM",
        "AutoModelForSequenceClassification",
        "a classifier on a causal-LM checkpoint (LlamaForSequenceClassification from a LlamaForCausalLM save): "
        "score missing, lm_head unexpected",
        ("score.weight",),
    ),
}

# model_type -> why it is not a case
SKIPPED_ARCHS: dict[str, str] = {
    # builds tiny and loads fine, left out only because another case already covers the same path
    "zamba2": "builds tiny (3 layers); same tied shared-block path as arch-zamba",
    "mamba2": "builds tiny; same pure-SSM parameter path as arch-mamba",
    "bamba": "builds tiny; mamba2 + attention hybrid already covered by arch-jamba / arch-falcon-h1",
    "granitemoehybrid": "builds tiny; mamba2 + MoE hybrid already covered by arch-jamba / arch-granitemoe",
    "exaone_moe": "builds tiny; persistent e_score_correction_bias router already covered by arch-deepseek-v3",
    "solar_open": "builds tiny; persistent e_score_correction_bias router already covered by arch-deepseek-v3",
    "cohere2": "builds tiny; sliding/full Cohere variant of arch-cohere",
    "olmo3": "builds tiny; sliding/full Olmo2 variant, RoPE pattern covered by arch-gemma3-text",
    # composite (text + vision) configs: their text model is already a case
    "paligemma": (
        "builds tiny; its training forward needs token_type_ids (the prefix mask) on transformers 5.6.0 (not "
        "5.24.0), which the text-only step does not feed; a SigLIP tower and a tied Gemma head are covered by "
        "arch-gemma3"
    ),
    "llama4": "composite Llama4Config (text_config + vision_config); its text model is arch-llama4-text",
}


def _case(model_type: str, cls_name: str, kw: dict, guards: str, persistent: bool, model_class: str = "",
          suffix: str = "") -> Case:
    case = Case(
        name="arch-" + model_type.replace("_", "-") + suffix,
        guards=guards,
        config=partial(_config, cls_name, **kw),
        imports=(),
        dtype="float32",
        seed=0,
        tags=frozenset({"arch"}),
        **({"model_class": model_class} if model_class else {}),
    )
    return case.with_tags(PERSISTENT_BUFFER) if persistent else case


def _installed() -> set[str]:
    """Names the installed transformers exports: its lazy module lists them (`__all__`) without importing them.
    Not `dir(transformers)`, which merges that list quadratically (0.45 s in every process building the catalogue)."""
    import transformers

    return set(vars(transformers)) | set(getattr(transformers, "__all__", ()))


def _available_cases() -> list[Case]:
    """Cases for the architectures the installed transformers has; the rest are skipped with the reason.

    The version matrix runs the zoo against releases back to 5.0, which lack
    the newest architectures (DeepSeek-V3.2, Kimi-Linear, Gemma 4, ...).
    """
    import transformers

    installed = _installed()
    cases = []
    for model_type, (cls_name, *spec) in {**_SPECS, **_EXTRA_SPECS}.items():
        if cls_name in installed:
            cases.append(_case(model_type, cls_name, *spec))
        else:
            SKIPPED_ARCHS.setdefault(model_type, f"{cls_name} is not in the installed transformers {transformers.__version__}")
    for model_type, (cls_name, kw, guards, root_buffers) in _BASE_SPECS.items():
        if cls_name in installed:
            case = _case(model_type, cls_name, kw, guards, False, model_class=BASE_MODEL_CLASS, suffix="-base")
            if root_buffers:
                case = case.with_tags(tensors={ROOT_NON_PERSISTENT: root_buffers})
            if model_type in _ROOT_BUFFER_OUTPUT_UNCHANGED:
                case = case.with_tags(ROOT_NON_PERSISTENT_OUTPUT_UNCHANGED)
            if model_type in _ROOT_BUFFER_UNREAD:
                case = case.with_tags(ROOT_NON_PERSISTENT_UNREAD)
            cases.append(case)
    for name, (model_type, cls_name, kw, loaded_as, guards, persistent, tied) in _CLASS_SPECS.items():
        if cls_name in installed:
            case = replace(_case(model_type, cls_name, kw, guards, persistent, model_class=loaded_as), name=f"arch-{name}")
            cases.append(case.with_tags(tensors={TIED_BEYOND_EMBEDDINGS: (tied,)}) if tied else case)
        else:
            SKIPPED_ARCHS.setdefault(name, f"{cls_name} is not in the installed transformers {transformers.__version__}")
    for name, (model_type, cls_name, kw, saved_as, loaded_as, guards, missing) in _HEAD_SPECS.items():
        if cls_name in installed:
            case = _case(model_type, cls_name, kw, guards, False, model_class=loaded_as)
            cases.append(replace(case, name=f"arch-{name}", checkpoint_class=saved_as).with_tags(
                tensors={MISSING_PARAMETERS: missing}))
    return cases


ARCH_CASES: list[Case] = _available_cases()
