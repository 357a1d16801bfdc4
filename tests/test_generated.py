"""Generated model layouts (toy_models/generated/), loaded in real torchrun launches.

The engine (hypothesis draws, one batched launch per loader, shrinking in
rounds) is tests/generated_engine.py; this file holds the tests.

Replay (docs/generated-layouts.md):
  FSDP_LOAD_CHECKS_GENERATED_REPLAY=path/to/layout.json  pytest tests/test_generated.py -k replay [--loader L]
  FSDP_LOAD_CHECKS_GENERATED_REPLAY='{"dtype": ...}'      (inline JSON: one layout or a list)
  FSDP_LOAD_CHECKS_GENERATED_REPLAY=SEED:gen-0123456789   (a drawn layout, by seed and case name)
Other knobs: FSDP_LOAD_CHECKS_GENERATED_SEED, FSDP_LOAD_CHECKS_GENERATED_EXAMPLES,
FSDP_LOAD_CHECKS_SLOW=1 (the regression-loader hunt, minutes per loader).
"""

from __future__ import annotations

import json
import os
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fsdp_load_checks import catalogue, observe  # noqa: E402
from fsdp_load_checks.checks import LOGIT_TOLERANCE  # noqa: E402
from fsdp_load_checks.loaders import FIXED_LOADER  # noqa: E402
from fsdp_load_checks.records import Status  # noqa: E402
from tests.generated_engine import (  # noqa: E402
    EXAMPLES,
    OK_STOCK,
    OK_STRICT,
    REPLAY_ENV,
    SEED,
    SHRINK_ENV,
    Runs,
    check_batch,
    draw,
    failure_report,
    find_and_shrink,
    outcomes,
    replay_layouts,
    unique,
    weight,
)
from toy_models import generated  # noqa: E402

SLOW_ENV = "FSDP_LOAD_CHECKS_SLOW"

# features a fixed-seed batch must cover (generated.features names)
REQUIRED_FEATURES = {
    "dtype:float32", "dtype:bfloat16", "depth:1", "depth:2", "depth:3",
    "param", "param:1-element", "param:uneven-dim0",
    "buffer:float32", "buffer:int64", "buffer:bool", "buffer:scalar",
    "buffer:persistent", "buffer:non-persistent", "buffer:recomputed", "buffer:forgotten",
    "shared:non-persistent", "tie:params", "tie:embeddings", "drop", "root-tensors",
}  # fmt: skip


CANARY = {  # a non-persistent buffer on the root module: rank 1 gets it wrong only on the non-loading branch
    "dtype": "float32",
    "vocab_size": 3,
    "hidden_size": 2,
    "tie_embeddings": False,
    "modules": {
        "": [{"name": "b0", "kind": "buffer", "shape": [2], "dtype": "float32", "persistent": False, "init": "recomputed"}],
        "model.m0": [],
    },
    "ties": [],
    "shared": [],
    "drop_keys": [],
}



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        yield Runs(tmp_path_factory.mktemp("generated"), mp)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def drawn() -> list[dict]:
    return draw()


# ---------------------------------------------------------------- the strategy, without launching


def test_layouts_are_valid_serialisable_and_build(drawn):
    import torch
    from transformers import AutoModelForCausalLM

    assert len(drawn) == EXAMPLES
    for layout in unique(drawn):
        generated.validate(layout)
        assert json.loads(json.dumps(layout)) == layout
        case = generated.layout_case(layout)
        assert case.name == generated.layout_name(json.loads(generated.canonical(layout)))
        model = AutoModelForCausalLM.from_config(case.config())
        ids = observe.forward_input(model.config.get_text_config().vocab_size, torch.device("cpu"))
        logits = model(input_ids=ids).logits
        assert logits.shape == (observe.BATCH, observe.SEQ, layout["vocab_size"])
        names = set(model.state_dict())
        keys = set(generated.checkpoint_keys(layout))
        assert keys <= names, keys - names
        assert set(layout["drop_keys"]) <= set(generated.droppable_keys(layout))


def test_drawing_is_deterministic(drawn):
    assert [generated.layout_name(lay) for lay in draw()] == [generated.layout_name(lay) for lay in drawn]


def test_the_fixed_seed_batch_covers_every_feature(drawn):
    seen = set().union(*(generated.features(lay) for lay in drawn))
    assert REQUIRED_FEATURES <= seen, f"seed {SEED} misses {sorted(REQUIRED_FEATURES - seen)}"
    clean = [lay for lay in unique(drawn) if not generated.layout_case(lay).tags - {generated.GENERATED, generated.TIED, generated.DROPPED}]
    assert len(clean) >= 8, "too few layouts the stock stack must load cleanly"


def test_every_tensor_moves_the_logits(drawn):
    """A wrong value in any parameter or buffer (float, int or bool) changes the logits beyond the forward tolerance."""
    import torch
    from transformers import AutoModelForCausalLM

    for layout in unique(drawn)[:12]:
        torch.manual_seed(0)
        dtype = getattr(torch, layout["dtype"])
        model = AutoModelForCausalLM.from_config(generated.layout_case(layout).config()).to(dtype)
        ids = observe.forward_input(layout["vocab_size"], torch.device("cpu"))
        rtol, atol = LOGIT_TOLERANCE[layout["dtype"]]
        want = model(input_ids=ids).logits.float()
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            saved = tensor.detach().clone()
            with torch.no_grad():
                if tensor.dtype == torch.bool:
                    tensor.logical_not_()
                else:
                    tensor.add_(torch.ones_like(tensor) * (3 if tensor.dtype == torch.int64 else 0.5))
            got = model(input_ids=ids).logits.float()
            with torch.no_grad():
                tensor.copy_(saved)
            assert not torch.allclose(got, want, rtol=rtol, atol=atol), f"{generated.layout_name(layout)}: {name} does not reach the logits"


def test_bad_layouts_are_rejected():
    bad = json.loads(json.dumps(generated.example_layout()))
    bad["modules"]["model.m0"].append({"name": "b1", "kind": "buffer", "shape": [2], "dtype": "float32", "persistent": True, "init": "forgotten"})
    with pytest.raises(ValueError, match="only non-persistent"):
        generated.validate(bad)
    bad = json.loads(json.dumps(generated.example_layout()))
    bad["drop_keys"] = ["model.m0.nope"]
    with pytest.raises(ValueError, match="not a checkpoint key"):
        generated.validate(bad)


def test_cases_come_from_the_layouts_file(tmp_path, monkeypatch, drawn):
    path = tmp_path / "layouts.json"
    generated.write_layouts(path, drawn[:3])
    monkeypatch.setenv(catalogue.EXTRA_MODULES_ENV, generated.__name__)
    monkeypatch.setenv(generated.LAYOUTS_ENV, str(path))
    known = catalogue.all_cases()
    for lay in drawn[:3]:
        case = known[generated.layout_name(lay)]
        assert case.imports == generated.IMPORTS and case.dtype == lay["dtype"]
        assert case.drop_keys == tuple(lay["drop_keys"])
    monkeypatch.delenv(generated.LAYOUTS_ENV)
    assert not any(n.startswith("gen-") for n in catalogue.all_cases())


# ---------------------------------------------------------------- real launches


def both_loaders(runs, drawn) -> list[dict]:
    """The stock and the fixed loader over every layout, in one launch; the canary last in it (a stock case)."""
    layouts = [*drawn, CANARY]
    runs.batches({"stock": layouts, FIXED_LOADER: layouts})
    return layouts


def test_stock_loads_every_generated_layout_or_fails_only_by_known_issues(runs, drawn):
    layouts = both_loaders(runs, drawn)
    check_batch(runs, "stock", layouts, OK_STOCK)
    canary = outcomes(CANARY, runs.results["stock"][generated.layout_name(CANARY)], "stock")
    assert canary["buffers"].status == Status.XFAILED, (
        "rank 1 loaded the root-buffer canary (last in the launch) correctly: it did not take transformers' "
        "non-loading-rank branch, so FSDP_CPU_RAM_EFFICIENT_LOADING was lost between cases in a launch "
        "(accelerate's FullyShardedDataParallelPlugin.__post_init__ writes it into os.environ)"
    )


def test_fixed_loader_passes_every_generated_layout(runs, drawn):
    check_batch(runs, FIXED_LOADER, both_loaders(runs, drawn), OK_STRICT)


@pytest.mark.skipif(not os.environ.get(REPLAY_ENV), reason=f"set {REPLAY_ENV} to a layout JSON file, inline JSON or SEED:NAME")
def test_replay(runs, request):
    loader = request.config._fsdp_launch.loader  # canonical: an old alias names its loader
    layouts = replay_layouts(os.environ[REPLAY_ENV])
    for layout in layouts:
        generated.validate(layout)
    runs.batch(loader, layouts)
    ok = OK_STOCK if loader == "stock" else OK_STRICT
    failed = []
    for layout in layouts:
        got = outcomes(layout, runs.results[loader][generated.layout_name(layout)], loader)
        print(f"\n{generated.layout_name(layout)} ({loader}): " + ", ".join(f"{c} {o.status}" for c, o in got.items()))
        bad = {c: o for c, o in got.items() if o.status not in ok}
        if bad:
            failed.append(failure_report(layout, bad, loader, None))
    if failed:
        pytest.fail("\n\n".join(failed), pytrace=False)


# ---------------------------------------------------------------- hypothesis against the regressions (slow)

# regression loaders that must show on some generated layout, and what the shrunk layout may hold (any of)
HUNTS = {
    # garbage where ranks 1..N keep their own non-persistent buffers: a forgotten one, or one on the root module
    # (transformers never recomputes those on ranks 1..N, and this regression drops the reference's broadcast)
    "empty-like-era": ("buffer:forgotten", "root-tensors"),
    "persistent-buffers-on-meta": ("buffer:persistent",),
    "rank-local-persistent-buffers": ("buffer:persistent",),
    "non-persistent-not-recomputed": ("buffer:recomputed",),
    "non-persistent-cast-to-model-dtype": ("dtype:bfloat16",),
}


HUNT_LAUNCHES = int(os.environ.get(SHRINK_ENV, "30"))


@pytest.mark.skipif(not os.environ.get(SLOW_ENV), reason=f"slow (a batch and up to {HUNT_LAUNCHES} shrink launches per loader): set {SLOW_ENV}=1")
@pytest.mark.parametrize("loader", list(HUNTS))
def test_hypothesis_finds_and_shrinks_a_regression(runs, drawn, loader):
    runs.batch(loader, drawn)
    first: list[dict] = []
    original = runs.save_failure

    def save(loader_, layout):
        if not first:
            first.append(layout)  # the first failure hypothesis met, before shrinking
        return original(loader_, layout)

    runs.save_failure = save
    start = time.monotonic()
    error = find_and_shrink(runs, loader, OK_STRICT, launches=HUNT_LAUNCHES)
    assert error is not None, f"hypothesis found no layout that {loader} gets wrong (seed {SEED}, {EXAMPLES} examples)"
    shrunk = json.loads(runs.failures[loader].read_text())
    print(
        f"\n{loader}: first failing layout weight {weight(first[0])}, shrunk to weight {weight(shrunk)} with "
        f"{runs.shrink_launches[loader]} extra launches in {time.monotonic() - start:.0f}s:\n{generated.canonical(shrunk)}"
    )
    print("\n".join(line for line in str(error).splitlines() if line.startswith("  [")))
    assert set(HUNTS[loader]) & generated.features(shrunk), f"shrunk layout holds none of {HUNTS[loader]}"
    assert weight(shrunk) < weight(first[0]) or len(generated.tensor_specs(first[0])) <= 1, "hypothesis did not shrink"
