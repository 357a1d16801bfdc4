"""The historical regressions of the loading path, re-created as loaders, so every check is shown able to fail.

Each is the fixed loader (fixed.py) with one piece swapped for the
code of a past release or of a fix that was proposed upstream, so it shows
only its own symptom. The fixed loader fixes two independent things a
regression needs to get anywhere near its symptom, and every regression
keeps them: persistent buffers get through `fsdp2_prepare_model` (accelerate
releases crash on any, issue 3898) and rank 0 holds the right value of a
non-persistent buffer `_init_weights` forgets. Where a regression is about
what ranks 1..N compute for a non-persistent buffer, it also drops the
fixed loader's broadcast of rank 0's non-persistent buffers (A2), which would
overwrite the evidence: every accelerate release keeps each rank's own copy.

The non-rank-0 branches below are the code of
`PreTrainedModel._move_missing_keys_from_meta_to_device` under
`is_fsdp_enabled() and not is_local_dist_rank_0()`, as each era had it,
applied to the installed transformers (5.24.0). On ranks 1..N,
`_initialize_missing_keys` does the same in every 5.4+ version we could read
(state-dict entries and the model itself are marked initialised, submodules
are not, so `_init_weights` still recomputes non-persistent buffers), so the
eras share the installed one.

Which check catches which regression is the detection matrix
(`python -m fsdp_load_checks.detection`, tests/test_detection.py). This
module is imported by every rank at start-up: keep transformers and
accelerate imports inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _load(model, key, value) -> None:
    from transformers.modeling_utils import _load_parameter_into_model

    _load_parameter_into_model(model, key, value)


def empty_like_everything(model) -> None:
    """transformers 5.4.0 - 5.5.4, ranks 1..N: `torch.empty_like` for every parameter and buffer.

    Nothing is committed (pages untouched), but a buffer `_init_weights`
    does not recompute keeps whatever the allocator handed out.
    """
    import torch

    for key, param in model.named_parameters():
        _load(model, key, torch.empty_like(param, device="cpu"))
    for key, buffer in model.named_buffers():
        _load(model, key, torch.empty_like(buffer, device="cpu"))


def zeros_like_everything(model) -> None:
    """transformers 5.6.0 - 5.22.2 (PR 45050, "fix NaN weights"), ranks 1..N: `torch.zeros_like` for everything.

    Zero-filling writes every page: each non-rank-0 rank commits the whole
    model, values the broadcast then throws away (the OOM bisected in PR 45649).
    """
    import torch

    for key, param in model.named_parameters():
        _load(model, key, torch.zeros_like(param, device="cpu"))
    for key, buffer in model.named_buffers():
        _load(model, key, torch.zeros_like(buffer, device="cpu"))


def non_persistent_placeholders(model, dtype=None) -> None:
    """transformers 5.23.0+ (installed), ranks 1..N: zero placeholders for the non-persistent buffers only."""
    import torch

    for key, buffer in model.named_non_persistent_buffers():
        cast = dtype if dtype is not None and buffer.is_floating_point() else buffer.dtype
        _load(model, key, torch.zeros_like(buffer, device="cpu", dtype=cast))


def non_persistent_in_model_dtype(model) -> None:
    """Ranks 1..N give floating non-persistent buffers the model's dtype, as a blanket `.to(dtype)` of a
    meta-initialised model does (SkyRL PR 1725): fp32 RoPE `inv_freq` in a bf16 model becomes bf16
    there while rank 0 keeps fp32."""
    non_persistent_placeholders(model, dtype=model.dtype)


def persistent_buffers_left_on_meta(model) -> None:
    """Ranks 1..N leave persistent buffers on meta (placeholders only for the non-persistent ones).

    The state the PR 45649 review asked about: harmless when accelerate
    broadcasts persistent buffers (the fixed loader), fatal when a rank uses
    its own copy.
    """
    import torch

    non_persistent_placeholders(model)
    non_persistent = {k for k, _ in model.named_non_persistent_buffers(remove_duplicate=False)}
    for key, buffer in model.named_buffers():
        if key not in non_persistent:
            _load(model, key, torch.empty_like(buffer, device="meta"))


def zero_placeholders_for_all_buffers(model) -> None:
    """Ranks 1..N: zero placeholders for every buffer, persistent ones too (the `named_buffers()` loop of
    5.6.0 - 5.22.2 that the PR 45649 review proposed going back to); parameters stay as loaded."""
    import torch

    for key, buffer in model.named_buffers():
        _load(model, key, torch.zeros_like(buffer, device="cpu"))


@dataclass(frozen=True)
class Regression:
    name: str
    summary: str  # one line: the upstream era / PR it re-creates
    changes: dict = field(default_factory=dict)  # fields of fixed.Variant that differ from the fixed loader
    symptom: str = ""  # what the suite should see, and on which cases
    cases: tuple[str, ...] = ()  # the fewest toy cases that show it (tests/test_detection.py)
    poison: bool = False  # needs --poison-uninitialized to fail deterministically
    every_rank: bool = False  # the bug is in what every rank holds, rank 0 included (not a receiving-rank bug)


REGRESSIONS = [
    Regression(
        "empty-like-era",
        "transformers 5.4.0-5.5.4: torch.empty_like for every param and buffer on ranks 1..N; a buffer "
        "_init_weights does not recompute keeps garbage, kept by accelerate's per-rank restore",
        dict(non_rank0_branch=empty_like_everything, broadcast_non_persistent=False),
        "forgotten-buffer: rank 1 alibi_slopes NaN under --poison-uninitialized (garbage otherwise), NaN logits",
        cases=("forgotten-buffer",),
        poison=True,
    ),
    Regression(
        "zeros-like-era",
        "transformers 5.6.0-5.22.2 (PR 45050): torch.zeros_like for every param and buffer on ranks 1..N; "
        "values end right, but every non-rank-0 rank commits the whole model (OOM bisected in PR 45649)",
        dict(non_rank0_branch=zeros_like_everything),
        "big-llama: rank 1 commits the whole model during from_pretrained (memory); tensors end right",
        cases=("big-llama",),
    ),
    Regression(
        "persistent-buffers-on-meta",
        "ranks 1..N leave persistent buffers on meta (the variant questioned in the PR 45649 review), with an "
        "accelerate #3898 fix that keeps each rank's own copy: ranks 1..N crash copying out of meta",
        dict(non_rank0_branch=persistent_buffers_left_on_meta, persistent_buffers="rank-local"),
        "deepseek-router-bias (any persistent buffer): rank 1 raises NotImplementedError during fsdp2_prepare",
        cases=("deepseek-router-bias",),
    ),
    Regression(
        "rank-local-persistent-buffers",
        "accelerate #3898 fixed by keeping each rank's own persistent buffers instead of broadcasting them; "
        "ranks 1..N hold placeholders (5.6-5.22's named_buffers() zeros), so they keep zeros",
        dict(non_rank0_branch=zero_placeholders_for_all_buffers, persistent_buffers="rank-local"),
        "deepseek-router-bias: rank 1's e_score_correction_bias is zeros, logits differ",
        cases=("deepseek-router-bias",),
    ),
    Regression(
        "non-persistent-not-recomputed",
        "ranks 1..N skip initialize_weights() (the early return _initialize_missing_keys' own comment "
        "contemplates): non-persistent buffers stay zero placeholders, kept by accelerate's per-rank restore",
        dict(recompute_non_persistent=False, broadcast_non_persistent=False),
        "llama-rope: rank 1 inv_freq/original_inv_freq are zeros, logits differ",
        cases=("llama-rope",),
    ),
    Regression(
        "upcast-on-every-rank",
        "accelerate 1.14+ under mixed precision: every rank upcasts the loaded 16-bit parameters to fp32 "
        "before moving the model to meta; ranks 1..N copy weights the broadcast replaces (the stock stack, minus A3)",
        dict(receiving_upcast="copy"),
        "big-llama-bf16@bf16: rank 1 commits ~3.5x the model during fsdp2_prepare (memory); tensors end right",
        cases=("big-llama-bf16@bf16",),
    ),
    Regression(
        "half-precision-master-weights",
        "accelerate <= 1.13 under mixed precision: the upcast of trainable parameters is a no-op, so the "
        "optimizer's master weights stay bf16 (accelerate issue 3979)",
        dict(fp32_master_weights=False),
        "bf16-checkpoint@bf16: every rank's parameters are bfloat16 where fp32 master weights belong (parameters), "
        "and the optimizer steps them in bfloat16: gradients, parameters after the step (train-step)",
        cases=("bf16-checkpoint@bf16",),
        every_rank=True,
    ),
    Regression(
        "non-persistent-buffers-saved",
        "accelerate's re-registration of each rank's non-persistent buffers after fsdp2_prepare_model without its "
        "persistent=False (register_buffer's default): RoPE inv_freq enters every state dict and checkpoint, as "
        "torch's get_model_state_dict did until 2.3.1 (pytorch issue 122792)",
        dict(non_persistent_stay_non_persistent=False),
        "llama-rope: inv_freq/original_inv_freq in the gathered and round-tripped state dicts and in the "
        "save_pretrained file (state-dict); every value stays right",
        cases=("llama-rope",),
        every_rank=True,
    ),
    Regression(
        "tie-lost-on-meta",
        "fsdp2_prepare_model without its two tie_weights() calls: model.to('meta') and the assign-load each give the "
        "output head its own parameter (accelerate's own comments; verl issue 7834 shipped it in its FSDP2 loader), "
        "so FSDP2 shards embedding and head as two parameters",
        dict(retie=False),
        "tied-embeddings: the embedding gets only its input-side gradient and the head is not in the optimizer "
        "(train-step); the tie is gone (parameters) and save_pretrained writes it twice (state-dict)",
        cases=("tied-embeddings",),
        every_rank=True,
    ),
    Regression(
        "non-persistent-cast-to-model-dtype",
        "ranks 1..N cast non-persistent buffers to the model dtype (a blanket .to(dtype) after meta init, "
        "SkyRL PR 1725): fp32 RoPE in a bf16 model becomes bf16, kept by accelerate's per-rank restore",
        dict(non_rank0_branch=non_persistent_in_model_dtype, broadcast_non_persistent=False),
        "fp32-rope-in-bf16: rank 1 RoPE buffers are bfloat16 (logits stay within bf16 tolerance)",
        cases=("fp32-rope-in-bf16",),
    ),
]
