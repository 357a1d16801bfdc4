"""Each check on hand-built observations: it passes on the good value and fails on the bad one.

Problems are data (`records.Problem`); the tests read both the fields a
known issue matches on and the sentence `render.py` makes of them.
"""

from __future__ import annotations

import pytest
import torch

from fsdp_load_checks import render
from fsdp_load_checks.checks import CHECKS, verdicts
from fsdp_load_checks.observe import record
from fsdp_load_checks.records import (
    Against,
    CaseRun,
    Failure,
    LostHow,
    LostRank,
    Observation,
    Phase,
    ProblemKind,
    TensorKind,
)

PARAMETER, BUFFER, NON_PERSISTENT = TensorKind.PARAMETER, TensorKind.BUFFER, TensorKind.NON_PERSISTENT


def observation(rank: int, **overrides) -> Observation:
    tensors = {
        "w": torch.arange(6, dtype=torch.float32).view(2, 3),
        "bias": torch.tensor([0.5, 1.5]),
        "inv_freq": torch.tensor([1.0, 0.1]),
    }
    tensors.update(overrides.pop("tensors", {}))
    kinds = {"w": PARAMETER, "bias": BUFFER, "inv_freq": NON_PERSISTENT}
    obs = Observation(case="c", rank=rank, world_size=2)
    obs.tensors = {n: record(n, kinds[n], t) for n, t in tensors.items()}
    obs.logits = overrides.pop("logits", torch.ones(2, 3, 4))
    for key, value in overrides.items():
        setattr(obs, key, value)
    return obs


def run_of(*observations: Observation, lost=()) -> CaseRun:
    return CaseRun("c", world_size=2, observations={o.rank: o for o in observations}, lost=list(lost))


def problems(check: str, run: CaseRun, ref: Observation) -> list[str]:
    return render.lines(verdicts(run, ref)[check])


def found(check: str, run: CaseRun, ref: Observation):
    return verdicts(run, ref)[check].problems


GOOD = run_of(observation(0), observation(1))
REF = observation(-1)


@pytest.mark.parametrize("check", list(CHECKS))
def test_every_check_passes_on_identical_observations(check):
    assert problems(check, GOOD, REF) == []


def test_no_nan_flags_a_nan_buffer_with_rank_and_name():
    bad = run_of(observation(0), observation(1, tensors={"inv_freq": torch.tensor([float("nan"), 0.1])}))
    assert problems("no-nan", bad, REF) == ["c: rank 1 non-persistent buffer inv_freq has 1 NaN and 0 Inf of 2"]
    (p,) = found("no-nan", bad, REF)
    assert (p.kind, p.rank, p.tensor, p.tensor_kind, p.nan, p.inf, p.numel) == (
        ProblemKind.NON_FINITE, 1, "inv_freq", NON_PERSISTENT, 1, 0, 2
    )


def test_no_nan_flags_inf_logits():
    logits = torch.ones(2, 3, 4)
    logits[0, 0, 0] = float("inf")
    bad = run_of(observation(0), observation(1, logits=logits))
    assert problems("no-nan", bad, REF) == ["c: rank 1 logits have 0 NaN and 1 Inf of 24"]


def test_buffers_flags_a_buffer_unlike_rank_0():
    bad = run_of(observation(0), observation(1, tensors={"bias": torch.tensor([0.0, 0.0])}))
    (line,) = problems("buffers", bad, REF)
    assert line.startswith("c: rank 1 persistent buffer bias differs from rank 0's: 2/2 elements differ")
    (p,) = found("buffers", bad, REF)
    assert (p.kind, p.rank, p.tensor, p.against) == (ProblemKind.VALUES, 1, "bias", Against.RANK0)
    assert (p.difference.mismatched, p.difference.numel, p.difference.got, p.difference.want) == (2, 2, 0.0, 1.5)


def test_buffers_flags_a_buffer_equal_across_ranks_but_unlike_the_plain_load():
    zeros = {"inv_freq": torch.zeros(2)}
    bad = run_of(observation(0, tensors=zeros), observation(1, tensors=zeros))
    lines = problems("buffers", bad, REF)
    assert [line.split(":")[1].strip() for line in lines] == [
        "rank 0 non-persistent buffer inv_freq differs from the single-process load",
        "rank 1 non-persistent buffer inv_freq differs from the single-process load",
    ]


def test_buffers_flags_a_dtype_change():
    bad = run_of(observation(0), observation(1, tensors={"inv_freq": torch.tensor([1.0, 0.1], dtype=torch.bfloat16)}))
    assert problems("buffers", bad, REF) == [
        "c: rank 1 non-persistent buffer inv_freq has dtype bfloat16, rank 0's has float32"
    ]


def test_buffers_flags_a_buffer_left_on_meta():
    bad = run_of(observation(0), observation(1, tensors={"bias": torch.empty(2, device="meta")}))
    assert problems("buffers", bad, REF) == [
        "c: rank 1 persistent buffer bias is still on the meta device (never materialised)"
    ]


def test_parameters_flags_a_single_element_off():
    w = torch.arange(6, dtype=torch.float32).view(2, 3)
    w[1, 2] += 1e-3
    bad = run_of(observation(0, tensors={"w": w.clone()}), observation(1, tensors={"w": w.clone()}))
    lines = problems("parameters", bad, REF)
    assert len(lines) == 2 and "1/6 elements differ" in lines[0]


def test_parameters_flags_a_lost_tie():
    ref = observation(-1, ties=[("lm_head.weight", "embed.weight")])
    good = run_of(observation(0, ties=[("lm_head.weight", "embed.weight")]), observation(1, ties=[("lm_head.weight", "embed.weight")]))
    bad = run_of(observation(0, ties=[("lm_head.weight", "embed.weight")]), observation(1))
    assert problems("parameters", good, ref) == []
    assert problems("parameters", bad, ref) == ["c: rank 1 parameters embed.weight, lm_head.weight are no longer tied"]


def test_forward_tolerates_rounding_but_not_a_wrong_logit():
    close = run_of(observation(0), observation(1, logits=torch.ones(2, 3, 4) + 1e-7))
    far = run_of(observation(0), observation(1, logits=torch.ones(2, 3, 4) * 1.01))
    assert problems("forward", close, REF) == []
    (line,) = problems("forward", far, REF)
    assert line.startswith("c: rank 1 logits differ from the single-process load beyond rtol=1.3e-06")


def test_a_rank_that_raised_fails_every_check_naming_rank_and_exception():
    failure = Failure(1, Phase.FSDP2_PREPARE, "AttributeError", "'Tensor' object has no attribute 'device_mesh'", "tb")
    bad = run_of(observation(0), observation(1, failure=failure, tensors={}, logits=None))
    for check in CHECKS:
        assert problems(check, bad, REF) == [
            "c: rank 1 raised AttributeError: 'Tensor' object has no attribute 'device_mesh' (during fsdp2_prepare)"
        ]
        (p,) = found(check, bad, REF)
        assert p.kind == ProblemKind.RAISED and p.failure is failure


def test_a_collective_broken_by_the_peer_that_raised_first_echoes_it_and_is_not_reported():
    gloo = ("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:2713. This is typically caused "
            "by a remote worker crashing.")
    echo = Failure(0, Phase.FSDP2_PREPARE, "RuntimeError", gloo, "tb")
    cause = Failure(1, Phase.FSDP2_PREPARE, "RuntimeError", "injected fault", "tb")
    both = run_of(observation(0, failure=echo, tensors={}, logits=None),
                  observation(1, failure=cause, tensors={}, logits=None))
    assert problems("buffers", both, REF) == ["c: rank 1 raised RuntimeError: injected fault (during fsdp2_prepare)"]
    # alone, the broken collective is all there is to say: it is reported
    alone = run_of(observation(0, failure=echo, tensors={}, logits=None), observation(1))
    assert problems("buffers", alone, REF) == [f"c: rank 0 raised RuntimeError: {gloo} (during fsdp2_prepare)"]


def test_a_failed_forward_blocks_only_the_forward_check():
    failure = Failure(1, Phase.FORWARD, "RuntimeError", "boom", "tb")
    bad = run_of(observation(0), observation(1, failure=failure, logits=None))
    assert problems("buffers", bad, REF) == []
    assert problems("forward", bad, REF) == ["c: rank 1 raised RuntimeError: boom (during forward)"]


def test_a_lost_rank_fails_every_check():
    lost = LostRank(1, "c", Phase.OBSERVE, LostHow.DIED, -6, "tail")
    bad = run_of(observation(0), lost=[lost])
    for check in CHECKS:
        assert problems(check, bad, REF) == ["c: rank 1 died during observe of c, exit code -6 (SIGABRT)"]
        (p,) = found(check, bad, REF)
        assert (p.kind, p.rank, p.lost) == (ProblemKind.LOST, 1, lost)


@pytest.mark.parametrize(
    "lost, line",
    [
        (LostRank(1, "c", Phase.OBSERVE, LostHow.HUNG, None, "", timeout_s=20), "rank 1 hung for more than 20s (killed; "
         "Python stacks in its log) during observe of c"),
        (LostRank(0, "c", Phase.OBSERVE, LostHow.BLOCKED, None, "", behind=(1,)), "rank 0 was blocked waiting for rank 1 "
         "(killed) during observe of c"),
        (LostRank(1, "c", Phase.STARTUP, LostHow.STARTUP_TIMEOUT, None, "", timeout_s=300), "rank 1 did not start within "
         "300s during startup of c"),
        (LostRank(1, "c", Phase.FORWARD, LostHow.STOPPED, -15, "", phase_case="d"), "rank 1 was stopped after a peer failed "
         "during forward (of d) of c, exit code -15 (SIGTERM)"),
    ],
)
def test_a_lost_rank_renders_its_story_from_fields(lost, line):
    assert render.lost_line(lost) == line


MODEL = 300 << 20


def with_memory(rank: int, from_pretrained: int, *, model: int = MODEL, local_rank: int | None = None, poisoned=False):
    from fsdp_load_checks.records import MemoryProfile, PhaseMemory

    obs = observation(rank)
    base = 500 << 20
    obs.memory = MemoryProfile(
        model_bytes=model,
        local_rank=rank if local_rank is None else local_rank,
        poisoned=poisoned,
        phases={"from_pretrained": PhaseMemory(base, base + from_pretrained // 2, base + from_pretrained)},
    )
    return obs


def test_memory_passes_when_receiving_ranks_commit_nothing():
    run = run_of(with_memory(0, 1 << 20), with_memory(1, 1 << 20))
    assert verdicts(run, REF)["memory"].passed and not verdicts(run, REF)["memory"].skipped


def test_memory_catches_the_zeros_like_regression_on_the_receiving_rank():
    run = run_of(with_memory(0, 1 << 20), with_memory(1, MODEL))  # the whole model committed on rank 1
    assert problems("memory", run, REF) == [
        "c: rank 1 committed 300.0 MiB (1.00x the 300.0 MiB model) during from_pretrained; a rank that only "
        "receives rank 0's weights may commit at most 0.1x (RssAnon, peak over the phase)"
    ]
    (p,) = found("memory", run, REF)
    assert (p.kind, p.rank, p.memory.loading, p.memory.multiple, p.memory.bound) == (ProblemKind.MEMORY, 1, False, 1.0, 0.1)


def test_memory_bounds_the_loading_rank_by_a_multiple():
    run = run_of(with_memory(0, 2 * MODEL), with_memory(1, 0))
    assert problems("memory", run, REF)[0].startswith("c: rank 0 committed 600.0 MiB (2.00x")


def test_memory_judges_each_nodes_local_rank_0_as_a_loading_rank():
    # 2 nodes x 1 rank: global rank 1 is its node's LOCAL_RANK 0 and loads the checkpoint itself
    run = run_of(with_memory(0, MODEL), with_memory(1, MODEL, local_rank=0))
    assert problems("memory", run, REF) == []


@pytest.mark.parametrize(
    "kwargs, reason",
    [({"model": 1 << 20}, "below the 64 MiB"), ({"poisoned": True}, "--poison-uninitialized")],
)
def test_memory_says_why_it_cannot_judge(kwargs, reason):
    run = run_of(with_memory(0, 0, **kwargs), with_memory(1, 10 * MODEL, **kwargs))
    verdict = verdicts(run, REF)["memory"]
    assert verdict.passed and reason in verdict.skipped
