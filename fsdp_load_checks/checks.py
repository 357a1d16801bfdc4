"""Verdicts: pure functions of observations, no process group, no I/O.

Each check returns a list of problems, one line each, naming the case,
the rank, the tensor and the difference; an empty list is a pass. A case
whose ranks did not all report (a crash, a hang) fails every check with
that failure, since nothing about it could be verified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fsdp_load_checks.launch import CaseRun
from fsdp_load_checks.observe import BUFFER, NON_PERSISTENT, PARAMETER, Observation, TensorRecord

# torch.testing's default tolerances per dtype. FSDP2 gathers the very same
# weights and runs the same kernels as a plain process, so on CPU logits come
# out bit-identical; on CUDA ranks vs the CPU reference, kernels round
# differently. Any wrong weight or buffer moves logits far beyond these.
LOGIT_TOLERANCE = {
    "float32": (1.3e-6, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float16": (1e-3, 1e-5),
}


@dataclass
class Verdict:
    case: str
    check: str
    problems: list[str] = field(default_factory=list)
    details: str = ""  # long text for the report (tracebacks, log tails)
    skipped: str = ""  # why this check could not judge this case (never set when a problem was found)

    @property
    def passed(self) -> bool:
        return not self.problems


def describe_difference(got: torch.Tensor, want: torch.Tensor) -> str:
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} vs {tuple(want.shape)}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} vs {want.dtype}"
    if got.numel() == 0:
        return "contents differ"
    g, w = got.double().flatten(), want.double().flatten()
    diff = (g - w).abs().nan_to_num(nan=float("inf"))
    i = int(diff.argmax())
    mismatched = int((g != w).sum() - (g.isnan() & w.isnan()).sum())
    return f"{mismatched}/{g.numel()} elements differ, max |diff| at [{i}]: {g[i].item():.6g} vs {w[i].item():.6g}"


def compare(rec: TensorRecord, want: TensorRecord, who: str, against: str) -> str | None:
    if rec.dtype != want.dtype:
        return f"{who} {rec.kind} {rec.name} has dtype {rec.dtype}, {against} has {want.dtype}"
    if tuple(rec.shape) != tuple(want.shape):
        return f"{who} {rec.kind} {rec.name} has shape {tuple(rec.shape)}, {against} has {tuple(want.shape)}"
    if rec.digest == want.digest:
        return None
    if rec.digest == "meta":
        return f"{who} {rec.kind} {rec.name} is still on the meta device (never materialised)"
    if rec.value is not None and want.value is not None:
        detail = describe_difference(rec.value, want.value)
    elif rec.sample is not None and want.sample is not None:
        detail = f"sampled {rec.sample.numel()} of {_numel(rec)} elements (tensor too big to keep): " + (
            describe_difference(rec.sample, want.sample) if not torch.equal(rec.sample, want.sample) else "sample equal, bytes differ"
        )
    else:
        detail = "digests differ"
    return f"{who} {rec.kind} {rec.name} differs from {against}: {detail}"


def rank_label(rank: int) -> str:
    return f"rank {rank}"


def check_no_nan(run: CaseRun, ref: Observation) -> list[str]:
    problems = []
    for rank, obs in sorted(run.observations.items()):
        for rec in obs.tensors.values():
            if rec.nan or rec.inf:
                problems.append(f"rank {rank} {rec.kind} {rec.name} has {rec.nan} NaN and {rec.inf} Inf of {_numel(rec)}")
        if obs.logits is not None:
            nan, inf = int(obs.logits.isnan().sum()), int(obs.logits.isinf().sum())
            if nan or inf:
                problems.append(f"rank {rank} logits have {nan} NaN and {inf} Inf of {obs.logits.numel()}")
    return problems


def _numel(rec: TensorRecord) -> int:
    n = 1
    for d in rec.shape:
        n *= d
    return n


def _equal_everywhere(run: CaseRun, ref: Observation, kinds: tuple[str, ...], skip_ref: set[str]) -> list[str]:
    """Every tensor of these kinds on every rank equal to rank 0's and to the reference."""
    problems = []
    rank0 = run.observations[0]
    want_names = [n for n, r in ref.tensors.items() if r.kind in kinds]
    for rank, obs in sorted(run.observations.items()):
        got_names = {n for n, r in obs.tensors.items() if r.kind in kinds}
        for name in sorted(set(want_names) - got_names):
            problems.append(f"rank {rank} has no {ref.tensors[name].kind} {name} (the reference has it)")
        for name in sorted(got_names - set(want_names)):
            problems.append(f"rank {rank} has {obs.tensors[name].kind} {name} that the reference does not have")
        for name in want_names:
            rec = obs.tensors.get(name)
            if rec is None:
                continue
            if rank != 0 and name in rank0.tensors:
                problem = compare(rec, rank0.tensors[name], rank_label(rank), "rank 0's")
                if problem:
                    problems.append(problem)
                    continue
            if name not in skip_ref:
                problem = compare(rec, ref.tensors[name], rank_label(rank), "the single-process load")
                if problem:
                    problems.append(problem)
    return problems


def check_buffers(run: CaseRun, ref: Observation) -> list[str]:
    # non-persistent buffers are compared with the model's __init__ value where the plain load lost it
    return _equal_everywhere(run, ref, (BUFFER, NON_PERSISTENT), skip_ref=set())


def _note_difference(got: TensorRecord, want: TensorRecord) -> str:
    if got.digest == "meta":
        return "still on the meta device"
    if got.value is None or want.value is None:
        return "digests differ"
    return describe_difference(got.value, want.value)


def plain_load_notes(ref: Observation) -> list[str]:
    """What the single-process load itself got wrong: context for a buffers failure, not a rank's fault."""
    return [
        f"note: the single-process load itself leaves {rec.kind} {name} unlike the model's __init__ value "
        f"(transformers restores it only if _init_weights recomputes it; the check compares with __init__'s): "
        f"{_note_difference(rec, ref.tensors[name])}"
        for name, rec in sorted(ref.init_mismatch.items())
    ]


def check_parameters(run: CaseRun, ref: Observation) -> list[str]:
    # keys the checkpoint lacked are drawn by rank 0 and the reference from the same seed
    problems = _equal_everywhere(run, ref, (PARAMETER,), skip_ref=set())
    want_ties = {frozenset(t) for t in ref.ties}
    for rank, obs in sorted(run.observations.items()):
        got_ties = {frozenset(t) for t in obs.ties}
        for tie in sorted(want_ties - got_ties, key=sorted):
            problems.append(f"rank {rank} parameters {', '.join(sorted(tie))} are no longer tied")
    return problems


def check_forward(run: CaseRun, ref: Observation) -> list[str]:
    rtol, atol = LOGIT_TOLERANCE.get(_model_dtype(ref), LOGIT_TOLERANCE["float32"])
    problems = []
    for rank, obs in sorted(run.observations.items()):
        if obs.logits is None:
            problems.append(f"rank {rank} produced no logits")
            continue
        if obs.logits.shape != ref.logits.shape:
            problems.append(f"rank {rank} logits shape {tuple(obs.logits.shape)}, reference {tuple(ref.logits.shape)}")
            continue
        if not torch.allclose(obs.logits, ref.logits, rtol=rtol, atol=atol, equal_nan=False):
            detail = describe_difference(obs.logits, ref.logits)
            problems.append(
                f"rank {rank} logits differ from the single-process load beyond rtol={rtol:g} atol={atol:g}: {detail}"
            )
    return problems


MiB = 1 << 20
# Loading (from_pretrained) on a rank that is not its node's loading rank must commit next to nothing:
# its tensors are replaced by rank 0's broadcast. The zeros_like era committed 1.00x the model there;
# the fixed path commits ~0.00x. A bound of 0.10x sits 10x below the regression.
NON_LOADING_RANK_FRACTION = 0.10
# The loading rank (LOCAL_RANK 0) maps the checkpoint; a matching dtype costs no anonymous memory at all.
# A cast or a second copy costs 1x; more than 1.5x means the model is held more than once.
LOADING_RANK_MULTIPLE = 1.5
# Below this size the allocator's own noise (tens of MiB from imports and arenas) swamps a 0.10x bound.
MEMORY_MIN_MODEL_BYTES = 64 * MiB


def memory_skip_reason(run: CaseRun) -> str:
    profiles = [obs.memory for obs in run.observations.values()]
    if any(p.poisoned for p in profiles):
        return "--poison-uninitialized fills uninitialised memory on every rank, which commits it: memory is not measured"
    size = max((p.model_bytes for p in profiles), default=0)
    if size < MEMORY_MIN_MODEL_BYTES:
        return (
            f"a {size / MiB:.2f} MiB model is below the {MEMORY_MIN_MODEL_BYTES // MiB} MiB a "
            f"{NON_LOADING_RANK_FRACTION:g}x bound can resolve above allocator noise; the big-* cases measure memory"
        )
    return ""


def check_memory(run: CaseRun, ref: Observation) -> list[str]:
    problems = []
    for rank, obs in sorted(run.observations.items()):
        mem = obs.memory
        phase = mem.phases.get("from_pretrained")
        if phase is None:
            problems.append(f"rank {rank} recorded no memory for from_pretrained")
            continue
        loading = mem.local_rank == 0
        bound = (LOADING_RANK_MULTIPLE if loading else NON_LOADING_RANK_FRACTION) * mem.model_bytes
        if phase.committed > bound:
            who = "the loading rank (LOCAL_RANK 0)" if loading else "a rank that only receives rank 0's weights"
            problems.append(
                f"rank {rank} committed {phase.committed / MiB:.1f} MiB ({phase.committed / mem.model_bytes:.2f}x the "
                f"{mem.model_bytes / MiB:.1f} MiB model) during from_pretrained; {who} may commit at most "
                f"{bound / mem.model_bytes:g}x ({mem.source}, peak over the phase)"
            )
    return problems


def _model_dtype(obs: Observation) -> str:
    """The dtype most parameters have (fp32 buffers inside a bf16 model do not count)."""
    counts: dict[str, int] = {}
    for rec in obs.tensors.values():
        if rec.kind == PARAMETER:
            counts[rec.dtype] = counts.get(rec.dtype, 0) + _numel(rec)
    return max(counts, key=counts.get) if counts else "float32"


CHECKS: dict[str, Callable[[CaseRun, Observation], list[str]]] = {
    "no-nan": check_no_nan,
    "buffers": check_buffers,
    "parameters": check_parameters,
    "forward": check_forward,
    "memory": check_memory,
}

SKIPS: dict[str, Callable[[CaseRun], str]] = {"memory": memory_skip_reason}

CHECK_MEANING = {
    "no-nan": "no NaN or Inf in any parameter, buffer or logit on any rank",
    "buffers": "every buffer (persistent and not) bit-equal to rank 0's and to a plain load, same dtype",
    "parameters": "every parameter bit-equal to a plain load (rank 0's for keys the checkpoint lacks); ties kept",
    "forward": "logits on every rank match a plain load within the dtype's rounding tolerance",
    "memory": (
        f"from_pretrained commits at most {NON_LOADING_RANK_FRACTION:g}x the model's bytes on ranks that only receive, "
        f"{LOADING_RANK_MULTIPLE:g}x on the loading rank (models of {MEMORY_MIN_MODEL_BYTES // MiB} MiB and up)"
    ),
}


def blocking_failures(run: CaseRun, ref: Observation | None, needs_logits: bool) -> tuple[list[str], str]:
    """Failures that leave nothing to verify for a check.

    A process that raised during the forward pass still observed every
    tensor, so only the forward check is blocked by it; a rank that wrote
    no result, or raised earlier, blocks every check.
    """
    problems, details = [], []

    def blocks(obs: Observation) -> bool:
        return obs.failure is not None and (needs_logits or obs.failure.phase != "forward")

    if ref is None or blocks(ref):
        why = ref.failure.one_line() if ref is not None else "no reference observation"
        problems.append(f"the single-process reference load failed: {why}")
        if ref is not None:
            details.append(ref.failure.traceback)
    for rank, obs in sorted(run.observations.items()):
        if blocks(obs):
            problems.append(obs.failure.one_line())
            details.append(f"--- rank {rank} traceback ---\n{obs.failure.traceback}")
    for lost in run.lost:
        problems.append(lost.one_line())
        details.append(f"--- rank {lost.rank} log tail ({run.launch_dir}) ---\n{lost.log_tail}")
    return problems, "\n".join(details)


def verdicts(run: CaseRun, ref: Observation | None) -> dict[str, Verdict]:
    out = {}
    for name, fn in CHECKS.items():
        problems, details = blocking_failures(run, ref, needs_logits=name == "forward")
        skipped = ""
        if not problems:
            skipped = SKIPS[name](run) if name in SKIPS else ""
            problems = [] if skipped else fn(run, ref)
            if name == "buffers" and problems:
                details = "\n".join(plain_load_notes(ref))
        out[name] = Verdict(run.case, name, [f"{run.case}: {p}" for p in problems], details, skipped)
    return out
