"""Each check on hand-built observations: it passes on the good value and fails on the bad one.

Problems are data (`records.Problem`); the tests read both the fields a
known issue matches on and the sentence `render.py` makes of them.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from fsdp_load_checks import render
from fsdp_load_checks.checks import CHECKS, memory_bounds, verdicts
from fsdp_load_checks.observe import record
from fsdp_load_checks.records import (
    Against,
    CaseRun,
    Failure,
    LostHow,
    LostRank,
    Observation,
    Phase,
    PhaseMemory,
    ProblemKind,
    Quantity,
    Reload,
    TensorKind,
    TrainStep,
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
    # after loading: the state dict holds the parameter and the persistent buffer, never inv_freq
    saved = {n: obs.tensors[n] for n in ("w", "bias")}
    if rank <= 0:  # rank 0 gathers the full state dicts; the reference has the plain load's and its save
        obs.state_dict = dict(saved)
        obs.round_trip = dict(saved) if rank == 0 else {}
        obs.saved = dict(saved) if rank == -1 else {}
    obs.train = step()
    if rank > 0:  # gradients and stepped parameters are gathered by every rank and recorded by rank 0
        obs.train.grads, obs.train.params = {}, {}
    for key, value in overrides.items():
        setattr(obs, key, value)
    return obs


def step(loss: float = 2.5, grad=None, param=None, master: str = "float32", device: str = "cpu") -> TrainStep:
    grad = torch.tensor([[0.25, -0.5, 1e-7], [0.0, 2.0, -1.0]]) if grad is None else grad
    param = torch.arange(6, dtype=torch.float32).view(2, 3) - 1e-3 if param is None else param
    return TrainStep(loss=loss, loss_dtype="float32", grads={"w": record("w", PARAMETER, grad)},
                     params={"w": record("w", PARAMETER, param)}, master={"w": master}, device=device)


def reload_of(obs: Observation) -> Reload:
    """What a plain reload of a correct save reads back: the reference's saved file and state dict."""
    return Reload(saved=dict(obs.saved), state_dict=dict(obs.state_dict))


def run_of(*observations: Observation, lost=(), reload: Reload | None = None, world_size: int = 2) -> CaseRun:
    run = CaseRun("c", world_size=world_size, observations={o.rank: o for o in observations}, lost=list(lost))
    run.reload = reload if reload is not None else reload_of(observation(-1))
    return run


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


def prepared(rank: int, committed: int, **sizes) -> Observation:
    """A receiving rank with big-llama's preparation terms at 3 ranks (MiB), committing `committed` MiB."""
    obs = with_memory(rank, 0)
    mib = {"shard_bytes": 93, "largest_tensor_bytes": 64, **sizes}
    for name, value in mib.items():
        setattr(obs.memory, name, value << 20)
    obs.memory.phases["fsdp2_prepare"] = PhaseMemory(0, 0, committed << 20)
    return obs


def test_memory_at_an_uneven_split_allows_the_larger_upstream_copy_and_nothing_more():
    # 93 + 64 + 16 slack = 173 MiB at an even split; the last rank re-pads 77 MiB of short shards at the end
    even = run_of(with_memory(0, 0), prepared(1, 174))
    (p,) = found("memory", even, REF)
    assert [t for t, _ in p.memory.terms] == ["shard", "largest tensor", "slack"]
    assert found("memory", run_of(with_memory(0, 0), prepared(2, 250, repadded_bytes=77, padded_chunk_bytes=21)),
                 REF) == []
    (p,) = found("memory", run_of(with_memory(0, 0), prepared(2, 251, repadded_bytes=77, padded_chunk_bytes=21)),
                 REF)
    assert p.memory.terms[2] == ("short shards re-padded", 77 << 20)  # the larger of the two, not their sum
    assert "may commit at most 250.0 MiB = shard 93.0 + largest tensor 64.0 + short shards re-padded 77.0 + slack " \
           "16.0" in render.problem_line(p)
    (p,) = found("memory", run_of(with_memory(0, 0), prepared(1, 195, padded_chunk_bytes=21)), REF)
    assert p.memory.terms[2] == ("padded short chunk", 21 << 20)
    # what a report shows next to the figures: the same bounds, for a pass too
    assert memory_bounds(prepared(2, 0, repadded_bytes=77, padded_chunk_bytes=21).memory) == {
        "from_pretrained": int(0.1 * MODEL), "fsdp2_prepare": 250 << 20}


@pytest.mark.parametrize(
    "kwargs, reason",
    [({"model": 1 << 20}, "below the 64 MiB"), ({"poisoned": True}, "--poison-uninitialized")],
)
def test_memory_says_why_it_cannot_judge(kwargs, reason):
    run = run_of(with_memory(0, 0, **kwargs), with_memory(1, 10 * MODEL, **kwargs))
    verdict = verdicts(run, REF)["memory"]
    assert verdict.passed and reason in verdict.skipped


# ---------------------------------------------------------------- after loading: state-dict and train-step


def test_state_dict_flags_a_non_persistent_buffer_leaking_into_the_gathered_state_dict():
    rank0 = observation(0)
    rank0.state_dict["inv_freq"] = record("inv_freq", BUFFER, torch.tensor([1.0, 0.1]))
    assert problems("state-dict", run_of(rank0, observation(1)), REF) == [
        "c: rank 0 full state dict (accelerator.get_state_dict): has persistent buffer inv_freq, which the "
        "single-process load does not have"
    ]
    (p,) = found("state-dict", run_of(rank0, observation(1)), REF)
    assert (p.kind, p.rank, p.quantity, p.tensor) == (ProblemKind.UNEXPECTED, 0, Quantity.GATHERED, "inv_freq")


def test_state_dict_flags_the_fp32_master_copy_where_the_checkpoint_was_bf16():
    ref = observation(-1)
    ref.state_dict["w"] = record("w", PARAMETER, ref.tensors["w"].value.bfloat16())
    found_ = found("state-dict", run_of(observation(0), observation(1), reload=reload_of(ref)), ref)
    assert [(p.kind, p.quantity, p.tensor, p.got, p.want) for p in found_] == [
        (ProblemKind.DTYPE, Quantity.GATHERED, "w", "float32", "bfloat16"),
        (ProblemKind.DTYPE, Quantity.ROUND_TRIP, "w", "float32", "bfloat16"),
    ]


def test_state_dict_flags_a_key_lost_in_the_sharded_round_trip_and_a_value_changed_by_it():
    rank0 = observation(0)
    del rank0.round_trip["bias"]
    rank0.round_trip["w"] = record("w", PARAMETER, torch.zeros(2, 3))
    lines = problems("state-dict", run_of(rank0, observation(1)), REF)
    assert lines == [
        "c: rank 0 full state dict after a sharded save and load (DCP): has no persistent buffer bias (the "
        "single-process load has it)",
        "c: rank 0 full state dict after a sharded save and load (DCP): parameter w differs from the single-process "
        "load: 5/6 elements differ, max |diff| at [5]: 0 vs 5",
    ]


def test_state_dict_tells_a_tie_saved_twice_from_an_unexpected_key():
    ref = observation(-1, ties=[("w", "head.w")])
    ref.state_dict["head.w"] = ref.state_dict["w"]  # the state dict has both names; the plain save stores it once
    copy = reload_of(ref)
    copy.saved["head.w"] = copy.saved["w"]
    run = run_of(observation(0, state_dict=dict(ref.state_dict), round_trip=dict(ref.state_dict)), observation(1),
                 reload=copy)
    (p,) = found("state-dict", run, ref)
    assert (p.kind, p.quantity, p.tensor, p.got) == (ProblemKind.TIED_COPY, Quantity.SAVED, "head.w", "w")
    assert render.problem_line(p) == (
        "c: rank 0 save_pretrained file: holds parameter head.w as a second copy of tied w (the single-process "
        "save_pretrained stores the tie once)"
    )


def test_state_dict_pairs_a_tie_saved_twice_under_a_file_key_renamed_from_the_model_name():
    # a vision-language model's save writes its legacy layout: the model's `w` is the file's `legacy.w`
    ref = observation(-1, ties=[("w", "head.w")])
    ref.state_dict["head.w"] = ref.state_dict["w"]
    ref.saved["legacy.w"] = ref.saved.pop("w")
    copy = reload_of(ref)
    copy.saved["head.w"] = copy.saved["legacy.w"]
    copy.saved["other"] = copy.saved["legacy.w"]  # the same bytes under a name no tie has: still unexpected
    run = run_of(observation(0, state_dict=dict(ref.state_dict), round_trip=dict(ref.state_dict)), observation(1),
                 reload=copy)
    assert sorted((p.kind, p.tensor, p.got) for p in found("state-dict", run, ref)) == [
        (ProblemKind.TIED_COPY, "head.w", "legacy.w"),
        (ProblemKind.UNEXPECTED, "other", ""),
    ]


def test_state_dict_flags_a_save_that_does_not_load_back():
    failure = Failure(-1, Phase.RELOAD, "OSError", "no file named model.safetensors", "tb")
    assert problems("state-dict", run_of(observation(0), observation(1), reload=Reload(failure=failure)), REF) == [
        "c: the plain load of rank 0's save_pretrained directory raised OSError: no file named model.safetensors"
    ]
    wrong = reload_of(REF)
    wrong.state_dict["bias"] = record("bias", BUFFER, torch.tensor([0.5, 0.0]))
    (p,) = found("state-dict", run_of(observation(0), observation(1), reload=wrong), REF)
    assert (p.kind, p.quantity, p.tensor) == (ProblemKind.VALUES, Quantity.RELOADED, "bias")


def test_state_dict_without_a_reload_is_judged_only_when_rank_0_saved_nothing():
    stopped = run_of(observation(0, saved_dir="/tmp/x/saved"), observation(1))
    stopped.reload = None  # a signal ended the run before the batch's plain reload: the rest is still judged
    assert problems("state-dict", stopped, REF) == []
    stopped.observations[0].state_dict["bias"] = record("bias", BUFFER, torch.tensor([0.5, 0.0]))
    assert len(problems("state-dict", stopped, REF)) == 1
    unsaved = run_of(observation(0), observation(1))
    unsaved.reload = None  # no directory and no failure: never read as nothing to judge
    assert problems("state-dict", unsaved, REF) == ["c: rank 0 left no save_pretrained directory to load back"]


def test_train_step_is_exact_on_cpu_with_two_ranks():
    ulp = torch.tensor([[0.25, -0.5, 1e-7], [0.0, 2.0, -1.0]])
    ulp[0, 0] = torch.nextafter(ulp[0, 0], torch.tensor(1.0))
    bad = run_of(observation(0, train=step(grad=ulp)), observation(1))
    (p,) = found("train-step", bad, REF)
    assert (p.kind, p.rank, p.quantity, p.tensor, p.rtol, p.atol) == (ProblemKind.VALUES, 0, Quantity.GRADIENT, "w", 0, 0)
    assert problems("train-step", bad, REF)[0].startswith(
        "c: rank 0 gradient of parameter w differs from the single-process step: 1/6 elements differ"
    )
    # four ranks: FSDP2's sum of four equal gradients can round, so torch.testing's fp32 tolerance applies
    four = run_of(observation(0, train=step(grad=ulp)), observation(1), world_size=4)
    assert problems("train-step", four, REF) == []


def test_train_step_under_mixed_precision_on_more_ranks_allows_the_reduce_dtypes_rounding():
    # measured at 8 ranks on every @bf16 zoo case: the gradients, summed in bf16 before their cast to fp32, are one
    # bf16 ulp off on up to half of the elements
    want = torch.tensor([[0.25, -0.5, 1e-7], [0.0, 2.0, -1.0]]).bfloat16()
    ulp = want.clone()
    ulp[0, 0] = torch.nextafter(want[0, 0], torch.tensor(1.0, dtype=torch.bfloat16))
    ref = observation(-1, train=step(grad=want.float()), logits_dtype="bfloat16")
    eight = partial(run_of, world_size=8)
    assert problems("train-step", eight(observation(0, train=step(grad=ulp.float())), observation(1)), ref) == []
    (p,) = found("train-step", eight(observation(0, train=step(grad=want.float() * 1.05)), observation(1)), ref)
    assert (p.quantity, p.rtol, p.atol) == (Quantity.GRADIENT, 1.6e-2, 1e-5)  # bf16's, not fp32's: still a bound
    # two ranks stay exact under the policy too ((x + x) / 2 = x in bf16), and without one fp32's bound holds
    assert len(problems("train-step", run_of(observation(0, train=step(grad=ulp.float())), observation(1)), ref)) == 1
    plain = observation(-1, train=step(grad=want.float()))
    assert len(problems("train-step", eight(observation(0, train=step(grad=ulp.float())), observation(1)), plain)) == 1


def test_a_nan_both_sides_hold_at_one_element_agrees_under_a_tolerance():
    # arch-gemma3n-text's own gradient has NaN (the plain step's too); at 8 ranks the rest is compared within a
    # tolerance
    want = torch.tensor([[float("nan"), -0.5, 1e-7], [0.0, 2.0, -1.0]])
    ref = observation(-1, train=step(grad=want))
    near = want.clone()
    near[1, 1] = torch.nextafter(near[1, 1], torch.tensor(3.0))
    eight = partial(run_of, world_size=8)
    assert problems("train-step", eight(observation(0, train=step(grad=near)), observation(1)), ref) == []
    far = near.clone()
    far[1, 2] = -2.0
    (p,) = found("train-step", eight(observation(0, train=step(grad=far)), observation(1)), ref)
    assert (p.difference.mismatched, p.difference.index, p.difference.got) == (2, 5, -2.0)  # not the NaN pair
    lost = want.clone()
    lost[0, 0] = 0.25  # a NaN on one side only still differs
    (p,) = found("train-step", eight(observation(0, train=step(grad=lost)), observation(1)), ref)
    assert p.difference.index == 0


def test_train_step_allows_fp16_gradients_one_subnormal_step_from_fsdp2s_pre_division():
    want = torch.tensor([8.4579e-05, 1.0], dtype=torch.float16)  # 8.5e-5 / 2 falls below fp16's normal range
    one, two = want.clone(), want.clone()
    one[0] = torch.nextafter(want[0], torch.tensor(1.0, dtype=torch.float16))
    two[0] = torch.nextafter(one[0], torch.tensor(1.0, dtype=torch.float16))
    ref = observation(-1, train=step(grad=want))
    assert problems("train-step", run_of(observation(0, train=step(grad=one)), observation(1)), ref) == []
    (line,) = problems("train-step", run_of(observation(0, train=step(grad=two)), observation(1)), ref)
    assert "beyond rtol=0 atol=5.96046e-08" in line


def test_train_step_flags_the_loss_half_a_tie_and_a_master_weight_in_bf16():
    off = step(loss=2.75)
    off.grads, off.params = {}, {}
    lines = problems("train-step", run_of(observation(0), observation(1, train=off)), REF)
    assert lines == ["c: rank 1 loss differs from the single-process step: 2.75 vs 2.5"]
    half = torch.tensor([[0.125, -0.25, 5e-8], [0.0, 1.0, -0.5]])  # a tied parameter that got one of its two terms
    (p,) = found("train-step", run_of(observation(0, train=step(grad=half)), observation(1)), REF)
    assert (p.kind, p.quantity, p.difference.mismatched) == (ProblemKind.VALUES, Quantity.GRADIENT, 5)
    bf16 = step(master="bfloat16")
    bf16.grads, bf16.params = {}, {}
    assert problems("train-step", run_of(observation(0), observation(1, train=bf16)), REF) == [
        "c: rank 1 optimizer steps parameter w in bfloat16, the single-process step in float32"
    ]
    lost = step()
    lost.master = {}
    assert problems("train-step", run_of(observation(0, train=lost), observation(1)), REF) == [
        "c: rank 0 optimizer does not hold parameter w (the single-process step's does)"
    ]


def test_train_step_on_cuda_allows_rounding_and_a_flipped_near_zero_gradient_step():
    moved = torch.arange(6, dtype=torch.float32).view(2, 3) - 1e-3
    moved[0, 2] += 2e-3  # Adam's first step went the other way for one element
    cuda = step(grad=torch.tensor([[0.25, -0.5, -1e-7], [0.0, 2.0, -1.0]]), param=moved, device="cuda")  # sign flipped
    assert problems("train-step", run_of(observation(0, train=cuda), observation(1)), REF) == []
    far = step(param=moved + 0.01, device="cuda")
    assert len(problems("train-step", run_of(observation(0, train=far), observation(1)), REF)) == 1


@pytest.mark.parametrize(
    "phase, blocked",
    [
        (Phase.STATE_DICT, {"state-dict", "train-step"}),
        (Phase.TRAIN_STEP, {"state-dict", "train-step"}),  # save_pretrained comes after the step: never reached
        (Phase.SAVE_PRETRAINED, {"state-dict"}),
    ],
)
def test_a_rank_failing_after_loading_blocks_only_the_checks_it_left_without_data(phase, blocked):
    failure = Failure(1, phase, "RuntimeError", "boom", "tb")
    bad = run_of(observation(0), observation(1, failure=failure))
    assert {check for check in CHECKS if problems(check, bad, REF)} == blocked


def test_a_reference_that_failed_its_training_step_blocks_only_the_train_step_check():
    ref = observation(-1, failure=Failure(-1, Phase.TRAIN_STEP, "RuntimeError", "boom", "tb"))
    assert {check for check in CHECKS if problems(check, GOOD, ref)} == {"train-step"}
