"""Verdicts: pure functions of observations, no process group, no I/O.

Each check returns a list of `Problem` records (rank, tensor, kind of
difference, figures); an empty list is a pass. `render.py` turns them into
sentences; the only text made here says why a check cannot judge a case
(`SKIPS`) and what each check means (`CHECK_MEANING`, for `list` and the
README). A case whose ranks did not all report (a crash, a hang) fails
every check with that failure, since nothing about it could be verified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import torch

from fsdp_load_checks import observe
from fsdp_load_checks.records import (
    Against,
    CaseRun,
    Difference,
    MemoryExcess,
    MemoryProfile,
    Observation,
    Phase,
    Problem,
    ProblemKind,
    TensorKind,
    TensorRecord,
    Verdict,
)

# torch.testing's default tolerances per dtype. FSDP2 gathers the very same
# weights and runs the same kernels as a plain process, so on CPU logits come
# out bit-identical; on CUDA ranks vs the CPU reference, kernels round
# differently. Any wrong weight or buffer moves logits far beyond these.
LOGIT_TOLERANCE = {
    "float32": (1.3e-6, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float16": (1e-3, 1e-5),
}

MiB = 1 << 20
# Loading (from_pretrained) on a rank that is not its node's loading rank must commit next to nothing:
# its tensors are replaced by rank 0's broadcast. The zeros_like era committed 1.00x the model there;
# the fixed path commits ~0.00x. A bound of 0.10x sits 10x below the regression.
NON_LOADING_RANK_FRACTION = 0.10
# The loading rank (LOCAL_RANK 0) maps the checkpoint; a matching dtype costs no anonymous memory at all.
# A cast or a second copy costs 1x; more than 1.5x means the model is held more than once.
LOADING_RANK_MULTIPLE = 1.5
# FSDP2 preparation: beyond its shard and one tensor in flight, a rank keeps accelerate's and the optimizer's
# bookkeeping and allocator rounding; measured 0-4 MiB above shard + largest on big-llama (fp32 and bf16).
PREPARATION_SLACK_BYTES = 16 * MiB
# Below this size the noise floor of a from_pretrained that commits nothing (2.2-2.8 MiB on the first case of a
# launch, 0.02-0.7 MiB on later ones, measured on dense Llama/BERT of 87-280 MiB, with the model's modeling code
# imported before the baseline: model_class.loadable) comes too close to a 0.10x bound.
MEMORY_MIN_MODEL_BYTES = 64 * MiB


def difference(got: torch.Tensor, want: torch.Tensor) -> Difference:
    """Where and by how much two tensors of one dtype and shape differ."""
    g, w = got.double().flatten(), want.double().flatten()
    if g.numel() == 0:
        return Difference()
    diff = (g - w).abs().nan_to_num(nan=float("inf"))
    i = int(diff.argmax())
    mismatched = int((g != w).sum() - (g.isnan() & w.isnan()).sum())
    return Difference(mismatched, g.numel(), i, g[i].item(), w[i].item())


def compare(rec: TensorRecord, want: TensorRecord, rank: int, against: Against, check: str, case: str) -> Problem | None:
    """The first way `rec` differs from `want` (dtype, shape, meta, values), or None when bit-equal."""
    problem = partial(Problem, check, case, rank=rank, tensor=rec.name, tensor_kind=rec.kind, against=against)
    if rec.dtype != want.dtype:
        return problem(ProblemKind.DTYPE, got=rec.dtype, want=want.dtype)
    if tuple(rec.shape) != tuple(want.shape):
        return problem(ProblemKind.SHAPE, got=str(tuple(rec.shape)), want=str(tuple(want.shape)))
    if rec.digest == want.digest:
        return None
    if rec.digest == "meta":
        return problem(ProblemKind.ON_META)
    if rec.value is not None and want.value is not None:
        found = difference(rec.value, want.value)
    elif rec.sample is not None and want.sample is not None:
        equal = torch.equal(rec.sample, want.sample)
        found = Difference(sample_equal=True) if equal else difference(rec.sample, want.sample)
        found = dataclasses.replace(found, sampled=rec.sample.numel())
    else:
        found = Difference(digests_only=True)
    return problem(ProblemKind.VALUES, numel=rec.numel, difference=found)


def check_no_nan(run: CaseRun, ref: Observation) -> list[Problem]:
    problems = []
    for rank, obs in sorted(run.observations.items()):
        for rec in obs.tensors.values():
            if rec.nan or rec.inf:
                problems.append(Problem("no-nan", run.case, ProblemKind.NON_FINITE, rank=rank, tensor=rec.name,
                                        tensor_kind=rec.kind, nan=rec.nan, inf=rec.inf, numel=rec.numel))
        if obs.logits is not None:
            nan, inf = int(obs.logits.isnan().sum()), int(obs.logits.isinf().sum())
            if nan or inf:
                problems.append(Problem("no-nan", run.case, ProblemKind.NON_FINITE, rank=rank, tensor=ref.output,
                                        nan=nan, inf=inf, numel=obs.logits.numel()))
    return problems


def _equal_everywhere(run: CaseRun, ref: Observation, kinds: tuple[TensorKind, ...], check: str) -> list[Problem]:
    """Every tensor of these kinds on every rank equal to rank 0's and to the reference."""
    problems = []
    rank0 = run.observations[0]
    want_names = [n for n, r in ref.tensors.items() if r.kind in kinds]
    for rank, obs in sorted(run.observations.items()):
        got_names = {n for n, r in obs.tensors.items() if r.kind in kinds}
        for name in sorted(set(want_names) - got_names):
            problems.append(Problem(check, run.case, ProblemKind.MISSING, rank=rank, tensor=name,
                                    tensor_kind=ref.tensors[name].kind))
        for name in sorted(got_names - set(want_names)):
            problems.append(Problem(check, run.case, ProblemKind.UNEXPECTED, rank=rank, tensor=name,
                                    tensor_kind=obs.tensors[name].kind))
        for name in want_names:
            rec = obs.tensors.get(name)
            if rec is None:
                continue
            if rank != 0 and name in rank0.tensors:
                problem = compare(rec, rank0.tensors[name], rank, Against.RANK0, check, run.case)
                if problem:
                    problems.append(problem)
                    continue
            problem = compare(rec, ref.tensors[name], rank, Against.PLAIN_LOAD, check, run.case)
            if problem:
                problems.append(problem)
    return problems


def check_buffers(run: CaseRun, ref: Observation) -> list[Problem]:
    # non-persistent buffers are compared with the model's __init__ value where the plain load lost it
    return _equal_everywhere(run, ref, (TensorKind.BUFFER, TensorKind.NON_PERSISTENT), "buffers")


def check_parameters(run: CaseRun, ref: Observation) -> list[Problem]:
    # keys the checkpoint lacked are drawn by rank 0 and the reference from the same seed
    problems = _equal_everywhere(run, ref, (TensorKind.PARAMETER,), "parameters")
    want_ties = {frozenset(t) for t in ref.ties}
    for rank, obs in sorted(run.observations.items()):
        got_ties = {frozenset(t) for t in obs.ties}
        for tie in sorted(want_ties - got_ties, key=sorted):
            problems.append(Problem("parameters", run.case, ProblemKind.UNTIED, rank=rank, tensor=", ".join(sorted(tie)),
                                    tensor_kind=TensorKind.PARAMETER))
    return problems


def check_forward(run: CaseRun, ref: Observation) -> list[Problem]:
    # under mixed precision the forward runs in the policy's param_dtype: that dtype's rounding
    rtol, atol = LOGIT_TOLERANCE.get(ref.logits_dtype or model_dtype(ref), LOGIT_TOLERANCE["float32"])
    problems = []
    for rank, obs in sorted(run.observations.items()):
        problem = partial(Problem, "forward", run.case, rank=rank, tensor=ref.output)  # logits or last_hidden_state
        if obs.logits is None:
            problems.append(problem(ProblemKind.NO_LOGITS))
            continue
        if obs.logits.shape != ref.logits.shape:
            problems.append(problem(ProblemKind.LOGITS_SHAPE, got=str(tuple(obs.logits.shape)),
                                    want=str(tuple(ref.logits.shape))))
            continue
        if not torch.allclose(obs.logits, ref.logits, rtol=rtol, atol=atol, equal_nan=False):
            problems.append(problem(ProblemKind.LOGITS, against=Against.PLAIN_LOAD, rtol=rtol, atol=atol,
                                    numel=obs.logits.numel(), difference=difference(obs.logits, ref.logits)))
    return problems


def memory_skip_reason(run: CaseRun) -> str:
    """Why the memory check cannot judge this case ("" when it can)."""
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


def preparation_bound(mem: MemoryProfile) -> tuple[tuple[str, int], ...]:
    """The terms of what FSDP2 preparation may commit on one rank, in bytes (they sum to the bound).

    - its shard: the 1/N of the prepared parameters (and the buffers) it keeps;
    - one full tensor in flight: the broadcast receive buffer of the largest parameter
      (accelerate's `fsdp2_load_full_state_dict` receives one tensor at a time, then keeps its shard);
    - on the loading rank under mixed precision only: the fp32 copy of the state dict it broadcasts
      from (accelerate 1.14+ upcasts before `model.state_dict()`); a rank that only receives needs none;
    - a fixed slack for the allocator and the optimizer/accelerate bookkeeping.
    """
    terms = [("shard", mem.shard_bytes), ("largest tensor", mem.largest_tensor_bytes)]
    if mem.local_rank == 0 and mem.upcast_bytes:
        terms.append(("fp32 state dict to broadcast", mem.upcast_bytes))
    terms.append(("slack", PREPARATION_SLACK_BYTES))
    return tuple(terms)


def check_memory(run: CaseRun, ref: Observation) -> list[Problem]:
    """from_pretrained against fractions of the model; fsdp2_prepare against named terms (preparation_bound)."""
    problems = []
    for rank, obs in sorted(run.observations.items()):
        mem = obs.memory
        phase = mem.phases.get(Phase.FROM_PRETRAINED)
        if phase is None:
            problems.append(Problem("memory", run.case, ProblemKind.NO_MEMORY, rank=rank, phase=Phase.FROM_PRETRAINED))
            continue
        loading = mem.local_rank == 0
        if mem.shards_while_loading:
            problems.extend(_sharded_load_excess(run.case, rank, mem, phase.committed, loading))
            continue
        bound = LOADING_RANK_MULTIPLE if loading else NON_LOADING_RANK_FRACTION
        if phase.committed > bound * mem.model_bytes:
            excess = MemoryExcess(Phase.FROM_PRETRAINED, phase.committed, mem.model_bytes, bound, loading, mem.source)
            problems.append(Problem("memory", run.case, ProblemKind.MEMORY, rank=rank, memory=excess))
        prepare = mem.phases.get(Phase.FSDP2_PREPARE)
        if prepare is None or not mem.shard_bytes:  # preparation raised: nothing to bound
            continue
        problems += _beyond_terms(run.case, rank, Phase.FSDP2_PREPARE, prepare.committed, mem, loading,
                                  preparation_bound(mem))
    return problems


def sharded_load_bound(mem: MemoryProfile) -> tuple[tuple[str, int], ...]:
    """What `from_pretrained` may commit on a rank that reads only its own slice (transformers' distributed_config).

    Every rank alike: its shard of the parameters (and the buffers, which every rank holds whole), one full
    tensor in flight (a slice is cut from a tensor read whole, in the worst case), and the same fixed slack as
    preparation. There is no broadcast, so no rank is the loading one.
    """
    return (("shard", mem.shard_bytes), ("largest tensor", mem.largest_tensor_bytes), ("slack", PREPARATION_SLACK_BYTES))


def _sharded_load_excess(case: str, rank: int, mem: MemoryProfile, committed: int, loading: bool) -> list[Problem]:
    if not mem.shard_bytes:  # the load raised: nothing to bound
        return []
    return _beyond_terms(case, rank, Phase.FROM_PRETRAINED, committed, mem, loading, sharded_load_bound(mem))


def _beyond_terms(case: str, rank: int, phase: Phase, committed: int, mem: MemoryProfile, loading: bool,
                  terms: tuple[tuple[str, int], ...]) -> list[Problem]:
    """A MEMORY problem when `committed` bytes exceed the sum of the bound's named `terms`, else none."""
    limit = sum(size for _, size in terms)
    if committed <= limit:
        return []
    excess = MemoryExcess(phase, committed, mem.model_bytes, limit / mem.model_bytes, loading, mem.source, terms)
    return [Problem("memory", case, ProblemKind.MEMORY, rank=rank, memory=excess)]


def model_dtype(obs: Observation) -> str:
    """The dtype most parameters have (fp32 buffers inside a bf16 model do not count)."""
    counts: dict[str, int] = {}
    for rec in obs.tensors.values():
        if rec.kind == TensorKind.PARAMETER:
            counts[rec.dtype] = counts.get(rec.dtype, 0) + rec.numel
    return max(counts, key=counts.get) if counts else "float32"


CHECKS: dict[str, Callable[[CaseRun, Observation], list[Problem]]] = {
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
    "forward": (
        "the primary output (logits, or a base model's last_hidden_state) on every rank matches a plain load within "
        "the dtype's rounding tolerance"
    ),
    "memory": (
        f"from_pretrained commits at most {NON_LOADING_RANK_FRACTION:g}x the model's bytes on ranks that only receive, "
        f"{LOADING_RANK_MULTIPLE:g}x on the loading rank; fsdp2_prepare at most the rank's shard + the largest tensor "
        f"+ {PREPARATION_SLACK_BYTES // MiB} MiB (+ the fp32 state dict on the loading rank under mixed precision) "
        f"(models of {MEMORY_MIN_MODEL_BYTES // MiB} MiB and up)"
    ),
}


# problems that leave nothing to verify: a failed reference, a rank that raised, a rank that wrote no result,
# a case never launched
BLOCKING = (ProblemKind.REFERENCE_FAILED, ProblemKind.RAISED, ProblemKind.LOST, ProblemKind.NOT_RUN)


def blocking_failures(run: CaseRun, ref: Observation | None, check: str) -> list[Problem]:
    """Failures that leave nothing to verify for a check.

    A process that raised during the forward pass still observed every
    tensor, so only the forward check is blocked by it; a rank that wrote
    no result, or raised earlier, blocks every check.
    """
    if run.not_run is not None:  # never launched: that is the whole story
        return [Problem(check, run.case, ProblemKind.NOT_RUN, not_run=run.not_run)]
    needs_logits = check == "forward"

    def blocks(obs: Observation) -> bool:
        return obs.failure is not None and (needs_logits or obs.failure.phase != Phase.FORWARD)

    problems = []
    if ref is None or blocks(ref):
        problems.append(Problem(check, run.case, ProblemKind.REFERENCE_FAILED, failure=ref.failure if ref else None))
    raised = {rank: obs for rank, obs in sorted(run.observations.items()) if blocks(obs)}
    if any(not observe.peer_gone(obs.failure) for obs in raised.values()):
        # a rank whose collective broke because a peer that raised first went away only echoes that peer
        raised = {rank: obs for rank, obs in raised.items() if not observe.peer_gone(obs.failure)}
    for rank, obs in raised.items():
        problems.append(Problem(check, run.case, ProblemKind.RAISED, rank=rank, failure=obs.failure))
    for lost in run.lost:
        problems.append(Problem(check, run.case, ProblemKind.LOST, rank=lost.rank, lost=lost))
    return problems


def plain_load_notes(ref: Observation) -> list[Problem]:
    """What the single-process load itself got wrong: context for a buffers failure, not a rank's fault.

    One problem (rank None, check "buffers") per non-persistent buffer whose
    plain-load value differs from the model's own `__init__` value, which the
    reference keeps instead.
    """
    notes = []
    for name, got in sorted(ref.init_mismatch.items()):
        want = ref.tensors[name]
        note = partial(Problem, "buffers", ref.case, rank=None, tensor=name, tensor_kind=got.kind)
        if got.digest == "meta":
            notes.append(note(ProblemKind.ON_META))
        elif got.value is None or want.value is None:
            notes.append(note(ProblemKind.VALUES, difference=Difference(digests_only=True)))
        elif got.value.shape != want.value.shape:
            notes.append(note(ProblemKind.SHAPE, got=str(tuple(got.value.shape)), want=str(tuple(want.value.shape))))
        elif got.value.dtype != want.value.dtype:
            notes.append(note(ProblemKind.DTYPE, got=str(got.value.dtype), want=str(want.value.dtype)))
        else:
            notes.append(note(ProblemKind.VALUES, numel=got.numel, difference=difference(got.value, want.value)))
    return notes


def verdicts(run: CaseRun, ref: Observation | None) -> dict[str, Verdict]:
    """Every check's verdict on one case. `details` is left to the renderer (render.details)."""
    out = {}
    for name, fn in CHECKS.items():
        problems = blocking_failures(run, ref, name)
        skipped = ""
        if not problems:
            skipped = SKIPS[name](run) if name in SKIPS else ""
            problems = [] if skipped else fn(run, ref)
        out[name] = Verdict(run.case, name, problems, "", skipped)
    return out
