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
    Quantity,
    TensorKind,
    TensorRecord,
    Verdict,
)
from fsdp_load_checks.training import LEARNING_RATE

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
    # NaN on both sides at one element agrees (as equal bytes do); NaN on one side only is the largest difference
    both_nan = g.isnan() & w.isnan()
    diff = (g - w).abs().masked_fill(both_nan, 0).nan_to_num(nan=float("inf"))
    i = int(diff.argmax())
    mismatched = int((g != w).sum() - both_nan.sum())
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
    - at an uneven split only, the larger of two upstream copies that come at different moments
      (rank/prepare.prepared_sizes): padded copies of the short chunks of the tensor in flight (torch's
      distribute_tensor, on every rank), or, at the end, this rank's short shards re-padded by FSDP2 while
      accelerate's sharded state dict still holds them (the last rank, or the last few);
    - on the loading rank under mixed precision only: the fp32 copy of the state dict it broadcasts
      from (accelerate 1.14+ upcasts before `model.state_dict()`); a rank that only receives needs none;
    - a fixed slack for the allocator and the optimizer/accelerate bookkeeping.
    """
    terms = [("shard", mem.shard_bytes), ("largest tensor", mem.largest_tensor_bytes)]
    if mem.repadded_bytes or mem.padded_chunk_bytes:
        terms.append(("short shards re-padded", mem.repadded_bytes) if mem.repadded_bytes >= mem.padded_chunk_bytes
                     else ("padded short chunk", mem.padded_chunk_bytes))
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
        bound = _from_pretrained_multiple(mem)
        if phase.committed > bound * mem.model_bytes:
            excess = MemoryExcess(Phase.FROM_PRETRAINED, phase.committed, mem.model_bytes, bound, loading, mem.source)
            problems.append(Problem("memory", run.case, ProblemKind.MEMORY, rank=rank, memory=excess))
        prepare = mem.phases.get(Phase.FSDP2_PREPARE)
        if prepare is None or not mem.shard_bytes:  # preparation raised: nothing to bound
            continue
        problems += _beyond_terms(run.case, rank, Phase.FSDP2_PREPARE, prepare.committed, mem, loading,
                                  preparation_bound(mem))
    return problems


def _from_pretrained_multiple(mem: MemoryProfile) -> float:
    """The multiple of the model a rank may commit during from_pretrained: it loads (its node's LOCAL_RANK 0) or
    only receives."""
    return LOADING_RANK_MULTIPLE if mem.local_rank == 0 else NON_LOADING_RANK_FRACTION


def memory_bounds(mem: MemoryProfile) -> dict[str, int]:
    """Phase -> the bytes `check_memory` lets this rank commit in it: what a report shows next to the figure, so
    a pass says how much room it left (a failure names the terms)."""
    if mem.shards_while_loading:
        return {Phase.FROM_PRETRAINED: sum(size for _, size in sharded_load_bound(mem))} if mem.shard_bytes else {}
    bounds = {Phase.FROM_PRETRAINED: int(_from_pretrained_multiple(mem) * mem.model_bytes)}
    if mem.shard_bytes:
        bounds[Phase.FSDP2_PREPARE] = sum(size for _, size in preparation_bound(mem))
    return bounds


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


def _compare_all(got: dict[str, TensorRecord], want: dict[str, TensorRecord], rank: int, quantity: Quantity,
                 against: Against, check: str, case: str, ties: list[tuple[str, ...]] = (),
                 tolerance: Callable[[str], tuple[float, float]] | None = None) -> list[Problem]:
    """Every key of `want` in `got` and nothing more, each equal (bit for bit, or within `tolerance(dtype)`).

    A key `got` has beyond `want` that is one name of a tie (`ties`) holding
    the same bytes as another name of it present in both (or, for a file
    whose keys are renamed from the model's, as any key present in both) is
    a TIED_COPY: the tie was written as two tensors where `want` stores one.
    """
    problems = []
    problem = partial(Problem, check, case, rank=rank, quantity=quantity, against=against)
    for name in [n for n in want if n not in got]:
        problems.append(problem(ProblemKind.MISSING, tensor=name, tensor_kind=want[name].kind))
    for name in [n for n in got if n not in want]:
        twin = next((other for tie in ties if name in tie for other in tie
                     if other != name and other in want and other in got and got[other].digest == got[name].digest), None)
        if twin is None and any(name in tie for tie in ties):
            # a file's keys may be renamed from the model's (a VLM's save writes its legacy layout): the tie's other
            # name is then the key both hold with the same bytes
            twin = next((other for other in got if other != name and other in want
                         and got[other].digest == got[name].digest), None)
        if twin is not None:
            problems.append(problem(ProblemKind.TIED_COPY, tensor=name, tensor_kind=got[name].kind, got=twin))
        else:
            problems.append(problem(ProblemKind.UNEXPECTED, tensor=name, tensor_kind=got[name].kind))
    for name in [n for n in want if n in got]:
        rtol, atol = tolerance(want[name].dtype) if tolerance else (0.0, 0.0)
        found = compare(got[name], want[name], rank, against, check, case)
        if found and found.kind == ProblemKind.VALUES and (rtol or atol) and _close(got[name], want[name], rtol, atol):
            found = None
        if found:
            problems.append(dataclasses.replace(found, quantity=quantity, rtol=rtol, atol=atol))
    return problems


def _close(got: TensorRecord, want: TensorRecord, rtol: float, atol: float) -> bool:
    """Within tolerance on the values both kept (whole tensors, else the same strided sample); a NaN both hold at
    one element agrees there, as it does where the bytes are equal (a model whose own gradient has NaN)."""
    if got.value is not None and want.value is not None:
        return torch.allclose(got.value.double(), want.value.double(), rtol=rtol, atol=atol, equal_nan=True)
    if got.sample is not None and want.sample is not None:
        return torch.allclose(got.sample.double(), want.sample.double(), rtol=rtol, atol=atol, equal_nan=True)
    return False


def check_state_dict(run: CaseRun, ref: Observation) -> list[Problem]:
    """What a save writes equals the plain load: gathered, after a sharded round trip, saved, loaded back.

    The gathered full state dict (rank 0, `accelerator.get_state_dict`) and
    the one gathered after a sharded (DCP) save and load into a fresh model
    must hold exactly the plain load's `state_dict()` keys, dtypes (the
    dtype each was loaded in) and bytes. The files rank 0's `save_pretrained`
    wrote must hold what a plain `save_pretrained` writes (tied parameters
    once, no non-persistent buffer), and a plain load of them must give the
    plain load's state dict back. A run stopped by a signal after the case
    but before the batch's plain reload (parent/reload.py) has no `reload`:
    only the files' part goes unjudged.
    """
    problems = []
    rank0 = run.observations[0]
    against = partial(_compare_all, rank=0, check="state-dict", case=run.case)
    problems += against(rank0.state_dict, ref.state_dict, quantity=Quantity.GATHERED, against=Against.PLAIN_LOAD)
    problems += against(rank0.round_trip, ref.state_dict, quantity=Quantity.ROUND_TRIP, against=Against.PLAIN_LOAD)
    reload = run.reload
    if reload is None and rank0.saved_dir:  # the run was stopped (a signal) before the plain reload: not judged
        return problems
    if reload is None or reload.failure is not None:
        problems.append(Problem("state-dict", run.case, ProblemKind.RELOAD_FAILED, rank=0, quantity=Quantity.RELOADED,
                                failure=reload.failure if reload else None))
        return problems
    problems += against(reload.saved, ref.saved, quantity=Quantity.SAVED, against=Against.PLAIN_SAVE, ties=ref.ties)
    problems += against(reload.state_dict, ref.state_dict, quantity=Quantity.RELOADED, against=Against.PLAIN_LOAD)
    return problems


# The smallest positive float16 (a subnormal): one step of the rounding FSDP2's fp16 gradient average makes.
FLOAT16_SUBNORMAL = 2.0**-24


def train_step_tolerance(device: str, world_size: int, quantity: Quantity, dtype: str,
                         reduce_dtype: str = "") -> tuple[float, float]:
    """(rtol, atol) for one train-step value of `dtype` on ranks of `device`, against the single-process step;
    `reduce_dtype`: the mixed-precision policy's (accelerate sets reduce_dtype = param_dtype), "" without one.

    CPU, 1 or 2 ranks: exact (0, 0). Every rank computes the forward and
    backward on the same whole parameters, with the same kernels and thread
    count (1) as the reference process, on the same batch; FSDP2 averages
    fp32 and bf16 gradients with ReduceOp.AVG, and (x + x) / 2 = x exactly;
    AdamW is elementwise. Measured bit-equal on every zoo case, fp32 and
    under the bf16 policy (emulated in training.plain_step), 2 ranks.
    One exception, measured on fp16-checkpoint: a float16 model (no mixed
    precision) has float16 gradients, which FSDP2 pre-divides by 2 before
    summing to avoid overflow (torch fsdp/_fully_shard/_fsdp_collectives.py
    `_get_gradient_divide_factors`); x / 2 rounds where it falls below fp16's
    normal range, so such a gradient may differ by one subnormal step
    (atol = 2**-24; measured: exactly that, on 1-14 elements per tensor) and a
    parameter after the step by fp16's own rounding (torch.testing's fp16
    tolerance); parameters after the step came out bit-equal there.

    CPU, more ranks: the sum of N equal values can round before the division
    (3x for N = 4 with a sequential sum), so torch.testing's default for the
    dtype (LOGIT_TOLERANCE); an error of an ulp or two never flips a
    gradient's sign, so parameters after the step stay within it too. Under
    a mixed-precision policy that sum is made in the reduce dtype before the
    gradient is cast to its fp32 master's, so gradients get the reduce
    dtype's default (measured at 8 ranks: one bf16 ulp on up to half
    of the elements, every @bf16 zoo case); the fp32 parameters after the
    step keep fp32's (AdamW's first step is ~lr * sign(gradient)).

    CUDA (not measured here: no multi-GPU machine): kernels differ from the
    CPU reference, so the dtype's default; parameters after the first AdamW
    step move by about lr * sign(gradient), and rounding can flip the sign
    of a gradient that cancels to near zero, so they get atol = 2 * lr.
    """
    default = LOGIT_TOLERANCE.get(dtype, LOGIT_TOLERANCE["float32"])
    if device == "cpu" and world_size <= 2:
        if dtype == "float16" and quantity == Quantity.GRADIENT:
            return 0.0, FLOAT16_SUBNORMAL
        if dtype == "float16" and quantity == Quantity.STEPPED:
            return default
        return 0.0, 0.0
    if quantity == Quantity.GRADIENT and reduce_dtype:
        default = LOGIT_TOLERANCE.get(reduce_dtype, default)
    rtol, atol = default
    if device != "cpu" and quantity == Quantity.STEPPED:
        atol = max(atol, 2 * LEARNING_RATE)
    return rtol, atol


def check_train_step(run: CaseRun, ref: Observation) -> list[Problem]:
    """One training step on every rank equals the single-process step: every rank's loss and the dtype of what its
    optimizer steps (fp32 master weights under mixed precision); the full gradients (tied names: the summed
    gradient, under each name) and parameters after the step, which every rank gathers and rank 0 records."""
    problems = []
    want = ref.train
    for rank, obs in sorted(run.observations.items()):
        got = obs.train
        problem = partial(Problem, "train-step", run.case, rank=rank, against=Against.PLAIN_STEP)
        if got is None:
            problems.append(problem(ProblemKind.MISSING, quantity=Quantity.LOSS))
            continue
        # the reference's logits_dtype is the policy's param_dtype = reduce_dtype (reference/plain.py)
        tolerance = partial(train_step_tolerance, got.device, run.world_size, reduce_dtype=ref.logits_dtype)
        rtol, atol = tolerance(Quantity.LOSS, got.loss_dtype)
        loss, want_loss = torch.tensor([got.loss]), torch.tensor([want.loss])
        if not torch.allclose(loss, want_loss, rtol=rtol, atol=atol):
            problems.append(problem(ProblemKind.LOSS, quantity=Quantity.LOSS, tensor="loss", rtol=rtol, atol=atol,
                                    numel=1, difference=difference(loss, want_loss)))
        if rank == 0:  # gathered by every rank, recorded by rank 0: the same bytes everywhere
            compare_step = partial(_compare_all, rank=0, against=Against.PLAIN_STEP, check="train-step", case=run.case)
            problems += compare_step(got.grads, want.grads, quantity=Quantity.GRADIENT,
                                     tolerance=partial(tolerance, Quantity.GRADIENT))
            problems += compare_step(got.params, want.params, quantity=Quantity.STEPPED,
                                     tolerance=partial(tolerance, Quantity.STEPPED))
        for name, dtype in want.master.items():
            if name not in got.master:
                problems.append(problem(ProblemKind.MISSING, quantity=Quantity.MASTER, tensor=name,
                                        tensor_kind=TensorKind.PARAMETER))
            elif got.master[name] != dtype:
                problems.append(problem(ProblemKind.DTYPE, quantity=Quantity.MASTER, tensor=name,
                                        tensor_kind=TensorKind.PARAMETER, got=got.master[name], want=dtype))
    return problems


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
    "state-dict": check_state_dict,
    "train-step": check_train_step,
}

def after_skip_reason(run: CaseRun) -> str:
    """Why the after-loading checks cannot judge this case ("" when they can): the ranks never went through
    `Accelerator.prepare` (a loader that shards while loading), so accelerate's save and training path is not theirs;
    or the case does not run the after-loading steps (`Case.after_loading`: the big-* memory cases)."""
    if any(obs.memory.shards_while_loading for obs in run.observations.values()):
        return ("the model was sharded by from_pretrained itself (no Accelerator.prepare): accelerate's saving and "
                "training path does not apply, and is not checked for this loader")
    if any(not obs.after_loading for obs in run.observations.values()):
        return ("not run for this case (Case.after_loading): a big-* case exists for the memory check; its toy twin "
                "runs the same saving and training path")
    return ""


SKIPS: dict[str, Callable[[CaseRun], str]] = {
    "memory": memory_skip_reason, "state-dict": after_skip_reason, "train-step": after_skip_reason,
}

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
    "state-dict": (
        "the full state dict accelerate gathers, and again after a sharded (DCP) save and load, bit-equal to a plain "
        "load's state_dict (same keys, loaded dtypes); save_pretrained writes what a plain save writes and loads back equal"
    ),
    "train-step": (
        "one forward, backward and AdamW step on every rank equals a single-process step: loss, full gradients "
        "(tied: summed), parameters after the step (bit-equal on CPU), fp32 master weights under mixed precision"
    ),
}


# problems that leave nothing to verify: a failed reference, a rank that raised, a rank that wrote no result,
# a case never launched
BLOCKING = (ProblemKind.REFERENCE_FAILED, ProblemKind.RAISED, ProblemKind.LOST, ProblemKind.NOT_RUN)


# The phases whose records each check judges. A process that raised in a later phase still recorded them (a
# rank that raised during its training step still observed every tensor), so only the checks needing that phase
# or a later one are blocked. INIT_BUFFERS is the reference's own fix-up of what it observed.
NEEDS: dict[str, tuple[Phase, ...]] = {
    "no-nan": (Phase.OBSERVE, Phase.INIT_BUFFERS),
    "buffers": (Phase.OBSERVE, Phase.INIT_BUFFERS),
    "parameters": (Phase.OBSERVE, Phase.INIT_BUFFERS),
    "forward": (Phase.FORWARD,),
    "memory": (Phase.OBSERVE, Phase.INIT_BUFFERS),
    "state-dict": (Phase.STATE_DICT, Phase.SHARDED_ROUND_TRIP, Phase.SAVE_PRETRAINED),
    "train-step": (Phase.TRAIN_STEP,),
}
# the order the reference process goes through its phases (reference/plain.py); ranks: Phase.order
REFERENCE_ORDER = (Phase.FROM_PRETRAINED, Phase.OBSERVE, Phase.INIT_BUFFERS, Phase.FORWARD, Phase.STATE_DICT,
                   Phase.TRAIN_STEP)


def _blocks(obs: Observation, check: str) -> bool:
    """`obs` raised before or while recording what `check` judges (a phase the process does not know: before)."""
    if obs.failure is None:
        return False
    if obs.rank == -1:
        where = REFERENCE_ORDER.index(obs.failure.phase) if obs.failure.phase in REFERENCE_ORDER else -1
        return where <= max(REFERENCE_ORDER.index(p) for p in NEEDS[check] if p in REFERENCE_ORDER)
    return Phase.order(obs.failure.phase) <= max(Phase.order(p) for p in NEEDS[check])


def blocking_failures(run: CaseRun, ref: Observation | None, check: str) -> list[Problem]:
    """Failures that leave nothing to verify for a check.

    A process that raised in a phase after the ones a check judges (NEEDS)
    still recorded them, so it blocks only the checks needing that phase or
    a later one (a rank that raised during its training step still observed
    every tensor); a rank that wrote no result blocks every check.
    """
    if run.not_run is not None:  # never launched: that is the whole story
        return [Problem(check, run.case, ProblemKind.NOT_RUN, not_run=run.not_run)]

    def blocks(obs: Observation) -> bool:
        return _blocks(obs, check)

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
