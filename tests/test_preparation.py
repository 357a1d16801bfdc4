"""The preparation path users run: `Accelerator.prepare(model, optimizer)` from an accelerate config file.

A real launch (torchrun, gloo, real Accelerator, real plugin, real AdamW) proves every rank of every case
went through accelerate's own `prepare` under the config it was meant to; the mixed-precision semantics the
checks rely on (fp32 master weights, compute in the policy's dtype) are proven on real models and on the
checks' own functions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fsdp_load_checks import accelerate_config, catalogue, checks, known_issues
from fsdp_load_checks.parent import runner
from fsdp_load_checks.records import LaunchConfig, Observation, ProblemKind, Status
from fsdp_load_checks.reference.plain import cast_for_compute, upcast_trainable
from tests.cli_batch import CliRun, run_cli, run_pytest

# the first and the second case to prepare under each config's Accelerator, the bf16 ones after the switch
# (rank/prepare.py remake_accelerator) in the same launch (a second case once went through DDP instead)
CASES = ["llama-rope", "bf16-checkpoint", "llama-rope@bf16", "bf16-checkpoint@bf16"]
# the Trainer's wiring (loaders/trainer.py) in the same launch, as loader variants: first, before any preparation,
# and last, after two; the stock cases between show it leaves the rank as it found it
WIRING = ["llama-rope", "tied-embeddings"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    first, last = (c.with_loader("trainer-args") for c in catalogue.select(WIRING))
    cases = [first, *catalogue.select(CASES), last]
    return runner.run_batch(tmp_path_factory.mktemp("prep"), cases, LaunchConfig(nproc=2))


@pytest.mark.parametrize("case", CASES)
def test_every_rank_went_through_accelerator_prepare(prepared, case):
    mixed = "bf16" if case.endswith("@bf16") else "no"
    config = accelerate_config.BF16 if mixed == "bf16" else accelerate_config.DEFAULT
    result = prepared[case]
    assert sorted(result.run.observations) == [0, 1]
    for rank, obs in result.run.observations.items():
        assert obs.ok, obs.failure
        assert obs.preparation == {
            "config": config,
            "call": "Accelerator.prepare",
            "registered_model": True,  # the model accelerate keeps in Accelerator._models
            "optimizer": "AcceleratedOptimizer",  # accelerate's wrapper around our AdamW
            "is_fsdp2": True,
            "fsdp_module": True,  # fully_shard applied
            "mixed_precision": mixed,
            "device": "cpu",
        }, (case, rank)
    # the stock stack: a bf16 checkpoint under bf16 saves its fp32 master weights (a registered upstream issue)
    outcomes = known_issues.outcomes(result, catalogue.all_cases()[case], "stock")
    assert all(o.status != Status.FAILED for o in outcomes.values()), case


def test_both_configs_run_in_one_launch_each_case_under_its_own(prepared, tmp_path):
    # one launch: the ranks switched Accelerator between the configs (rank/prepare.py remake_accelerator); the
    # per-case configs themselves are asserted above, from accelerate's own bookkeeping on every rank
    assert len({result.run.launch_dir for result in prepared.values()}) == 1
    bf16 = runner.task_for(tmp_path, catalogue.select(["llama-rope@bf16"])[0])
    bf16_env = accelerate_config.load(accelerate_config.BF16).env
    assert (bf16.accelerate_config, bf16.accelerate_env) == (accelerate_config.BF16, bf16_env)
    assert runner.task_for(tmp_path, catalogue.select(["llama-rope"])[0]).accelerate_env is None  # the launch's


def test_under_bf16_the_prepared_parameters_are_fp32_master_weights(prepared):
    """bf16 checkpoint, bf16 config: every rank holds fp32 parameters, bit-equal to the plain load upcast."""
    result = prepared["bf16-checkpoint@bf16"]
    params = [r for r in result.reference.tensors.values() if r.kind == "parameter"]
    assert params and all(r.dtype == "float32" for r in params)
    for obs in result.run.observations.values():
        got = {n: r for n, r in obs.tensors.items() if r.kind == "parameter"}
        assert {n: r.dtype for n, r in got.items()} == {r.name: "float32" for r in params}
        assert all(got[r.name].digest == r.digest for r in params)
    # without mixed precision the same checkpoint stays bf16
    plain = prepared["bf16-checkpoint"].run.observations[1].tensors
    assert {r.dtype for r in plain.values() if r.kind == "parameter"} == {"bfloat16"}


def test_under_bf16_logits_are_computed_in_bf16_and_judged_at_its_tolerance(prepared):
    ref = prepared["llama-rope@bf16"].reference
    assert ref.logits_dtype == "bfloat16"
    fp32 = prepared["llama-rope"].reference
    assert fp32.logits_dtype == "" and not torch.equal(ref.logits, fp32.logits)  # the policy's rounding shows
    assert torch.equal(ref.logits, ref.logits.bfloat16().float())  # returned in the policy's output dtype


def test_reference_upcast_and_compute_cast_are_what_accelerate_does():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    upcast_trainable(model)
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param.detach(), before[name].float()), name
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    cast_for_compute(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)  # buffers are not the policy's business


def _obs(logits, dtype=""):
    obs = Observation(case="c", rank=-1, world_size=1, logits=logits)
    obs.logits_dtype = dtype
    return obs


def test_the_bf16_forward_comparison_fails_on_a_shift_bf16_rounding_cannot_explain():
    from fsdp_load_checks.records import CaseRun

    ref = _obs(torch.linspace(-4, 4, 64).bfloat16().float().view(1, 8, 8), "bfloat16")
    run = CaseRun("c", 2, {0: _obs(ref.logits.clone()), 1: _obs(ref.logits + 0.25)})
    problems = checks.check_forward(run, ref)
    assert [(p.rank, p.kind, p.rtol) for p in problems] == [(1, ProblemKind.LOGITS, 1.6e-2)]
    # one bf16 ulp of rounding passes at bf16 tolerance, and would fail at fp32's
    nudged = ref.logits * (1 + 2**-9)
    assert checks.check_forward(CaseRun("c", 1, {0: _obs(nudged)}), ref) == []
    assert checks.check_forward(CaseRun("c", 1, {0: _obs(nudged)}), _obs(ref.logits)) != []
    # a rank that produced no logits is a problem, never a pass
    missing = checks.check_forward(CaseRun("c", 1, {0: _obs(None)}), ref)
    assert [p.kind for p in missing] == [ProblemKind.NO_LOGITS]


def test_shipped_configs_are_read_by_accelerate_as_launch_would():
    default, bf16 = accelerate_config.load(accelerate_config.DEFAULT), accelerate_config.load(accelerate_config.BF16)
    assert default.mixed_precision == "no" and bf16.mixed_precision == "bf16"
    for config in (default, bf16):
        assert config.env["ACCELERATE_USE_FSDP"] == "true"
        assert config.env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
        assert config.env["FSDP_VERSION"] == "2"
    assert bf16.env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"  # TRL's
    assert bf16.env["ACCELERATE_MIXED_PRECISION"] == "bf16"


BAD_CONFIGS = {
    "missing": (None, "no such file"),
    "not-fsdp": ("distributed_type: MULTI_GPU\n", "distributed_type is not FSDP"),
    "fsdp1": ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n", "fsdp_version is 1"),
    "unknown-key": ("distributed_type: FSDP\nno_such_key: 1\nfsdp_config:\n  fsdp_version: 2\n", "unknown keys"),
    "unknown-fsdp-key": ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n  fsdp_bogus: 1\n",
                         "unknown fsdp_config key(s) fsdp_bogus"),
    "bad-yaml": ("distributed_type: [FSDP\n", "accelerate cannot read it"),
    "bad-mixed-precision": ("distributed_type: FSDP\nmixed_precision: bf17\nfsdp_config:\n  fsdp_version: 2\n",
                            "mixed_precision bf17 is not checked here"),
    "no-efficient-loading": ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n"
                             "  fsdp_cpu_ram_efficient_loading: false\n", "fsdp_cpu_ram_efficient_loading is off"),
}


PYTEST_TOO = ("missing", "not-fsdp", "unknown-fsdp-key")  # one parser behind both front ends: a few prove it


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory) -> dict[str, tuple[CliRun, CliRun | None]]:
    """kind -> (the CLI's run on its YAML, pytest's or None); each front end's runs in one interpreter
    (tests/cli_batch.py)."""
    base = tmp_path_factory.mktemp("bad-configs")
    paths = {kind: base / f"{kind}.yaml" for kind in BAD_CONFIGS}
    for kind, (text, _) in BAD_CONFIGS.items():
        if text is not None:
            paths[kind].write_text(text)
    runs = run_cli([["zoo", "--accelerate-config", str(paths[kind])] for kind in BAD_CONFIGS])
    zoo = str(Path(__file__).parent / "test_zoo.py")
    pytest_runs = run_pytest([["--fsdp-accelerate-config", str(paths[kind]), "--collect-only", "-q", zoo]
                              for kind in PYTEST_TOO], cwd=base)
    by_pytest = dict(zip(PYTEST_TOO, pytest_runs))
    return {kind: (run, by_pytest.get(kind)) for kind, run in zip(BAD_CONFIGS, runs)}


@pytest.mark.parametrize("kind", BAD_CONFIGS)
def test_a_bad_config_is_one_line_and_exit_2_in_both_front_ends(kind, bad_config_runs):
    message = BAD_CONFIGS[kind][1]
    cli, py = bad_config_runs[kind]
    assert cli.returncode == 2, cli.stderr
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in cli.stderr, cli.stderr
    if py is not None:  # the pytest plugin says the same, as a usage error
        assert py.returncode == 4 and message in py.stderr, py.stdout + py.stderr


def test_the_trainers_wiring_is_reported_as_its_known_issue(prepared):
    """TrainingArguments before from_pretrained under plain torchrun: every rank, every check, one exact symptom."""
    for case in (c.with_loader("trainer-args") for c in catalogue.select(WIRING)):
        result = prepared[case.name]
        assert {r: o.failure.exc_type for r, o in result.run.observations.items()} == {0: "PathNotExercised",
                                                                                       1: "PathNotExercised"}
        outcomes = known_issues.outcomes(result, case, "stock")  # the case's own loader counts, not the run's
        assert {o.status for o in outcomes.values()} == {"xfailed"}, outcomes
        assert {o.issues[0].key for o in outcomes.values()} == {"training-arguments-no-accelerate-use-fsdp"}
        # the same failure under a loader the issue is not registered for is a plain failure
        stock = catalogue.select([case.reference_name])[0]
        assert {o.status for o in known_issues.outcomes(result, stock, "stock").values()} == {"failed"}


def test_after_loading_every_rank_saved_stepped_and_rank_0_left_a_checkpoint_that_loads_back(prepared):
    """The after-loading phases ran on every rank of every case: rank 0 gathered both full state dicts and wrote
    a save_pretrained directory the parent had loaded back plain; every rank stepped, bit-equal on CPU."""
    for case in CASES:
        result = prepared[case]
        rank0 = result.run.observations[0]
        assert rank0.state_dict and rank0.round_trip and rank0.saved_dir, case
        assert result.run.reload is not None and result.run.reload.failure is None, case
        assert set(result.run.reload.state_dict) == set(result.reference.state_dict), case
        assert not Path(rank0.saved_dir).exists(), "the reload deletes the directory once read"
        assert result.run.observations[1].state_dict == {}, "only rank 0 keeps the gathered state dict"
        for obs in result.run.observations.values():
            assert obs.train is not None and obs.train.loss == result.reference.train.loss, case
        assert rank0.train.grads and {r.digest for r in rank0.train.grads.values()} <= {
            r.digest for r in result.reference.train.grads.values()}, case


def test_under_bf16_the_reference_steps_fp32_master_weights_with_bf16_gradients(prepared):
    step = prepared["bf16-checkpoint@bf16"].reference.train
    assert set(step.master.values()) == {"float32"}
    assert {r.dtype for r in step.grads.values()} == {"float32"}
    # computed in bf16 and cast back: every gradient is a bf16 value
    assert all(torch.equal(r.value, r.value.bfloat16().float()) for r in step.grads.values() if r.value is not None)
    plain = prepared["bf16-checkpoint"].reference.train
    assert set(plain.master.values()) == {"bfloat16"}  # no mixed precision: the model's own dtype


def test_the_fixed_loader_saves_one_tensor_per_parameter_in_its_loaded_dtype():
    from fsdp_load_checks.loaders.fixed import as_loaded

    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(4, 2)
    model.head = torch.nn.Linear(2, 4, bias=False)
    model.head.weight = model.embed.weight  # tied
    gathered = {"embed.weight": model.embed.weight.detach().clone(), "head.weight": model.embed.weight.detach().clone()}
    saved = as_loaded(model, gathered, {"embed.weight": torch.bfloat16, "head.weight": torch.bfloat16})
    assert saved["embed.weight"] is saved["head.weight"] and saved["head.weight"].dtype == torch.bfloat16


# (world, rank, layers (in, out, bias), prepared_sizes); byte figures worked out in the test's docstring
UNEVEN = [
    (3, 0, [(5, 7, True), (7, 6, False)], {"shard_bytes": 128, "largest_tensor_bytes": 168, "padded_chunk_bytes": 32,
                                           "repadded_bytes": 0}),
    (3, 2, [(5, 7, True), (7, 6, False)], {"shard_bytes": 128, "largest_tensor_bytes": 168, "padded_chunk_bytes": 32,
                                           "repadded_bytes": 72}),
    (4, 3, [(3, 5, True), (5, 4, False)], {"shard_bytes": 52, "largest_tensor_bytes": 80, "padded_chunk_bytes": 28,
                                           "repadded_bytes": 32}),
]


@pytest.mark.parametrize("world, rank, layers, sizes", UNEVEN)
def test_the_preparation_bound_measures_an_uneven_splits_padding_from_fsdp2s_own_layout(world, rank, layers, sizes):
    """prepared_sizes on a real fully_shard (torch's fake process group: one process plays `rank` of `world`).

    Over 3 ranks, weight (7, 5) and bias (7,) split 3/3/1 rows: padded chunks of 60 and 12 bytes, short on rank 2
    only; (6, 7) splits evenly (56-byte chunks): shard 128. The largest tensor, (6, 7) at 168 bytes, is even, so
    the most a tensor in flight adds is the (7, 5) weight's one padded short chunk beyond it: 140 + 60 - 168 = 32.
    Over 4 ranks, (5, 3) and (5,) split 2/2/1/0: two short chunks each, both padded in flight (torch pads empty
    chunks too): 60 + 2 * 24 - 80 = 28 beyond the even (4, 5) weight (80 bytes); rank 3, empty, re-pads 24 + 8.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fsdp_load_checks.rank.prepare import prepared_sizes

    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        model = torch.nn.Sequential(*(torch.nn.Linear(i, o, bias=b) for i, o, b in layers))
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        assert prepared_sizes(model) == sizes
    finally:
        dist.destroy_process_group()
