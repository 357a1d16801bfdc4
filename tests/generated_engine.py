"""The engine behind tests/test_generated.py: hypothesis draws, batched real launches, shrinking in rounds.

A fixed-seed batch of hypothesis-drawn layouts goes through ONE `runner.run_batch`
per loader (2 ranks); a hypothesis property then walks the very same draws and
reads each layout's verdicts from that batch. Only when a layout fails does
anything else launch: hypothesis shrinks it. A launch costs ~10-20 s here, so
shrinking runs in rounds: hypothesis replays the whole search from the seed,
answering every candidate it has a verdict for; the candidates it has none for
are taken as "not failing" for that round and noted, and the first
SHRINK_BATCH of them (the very next candidates of the real shrink) run in one
launch before the next round. A round that needs nothing new is exact:
hypothesis's own shrink, every answer real. At most
$FSDP_LOAD_CHECKS_GENERATED_SHRINK_LAUNCHES rounds launch; the failure names
the seed, the shrunk layout (and whether shrinking finished) and how to
replay it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import seed as hypothesis_seed

from fsdp_load_checks import catalogue, known_issues, render
from fsdp_load_checks.loaders.regressions import REGRESSIONS
from fsdp_load_checks.parent import runner
from fsdp_load_checks.records import CaseResult, LaunchConfig, Outcome, Status
from toy_models import generated

SEED_ENV = "FSDP_LOAD_CHECKS_GENERATED_SEED"
EXAMPLES_ENV = "FSDP_LOAD_CHECKS_GENERATED_EXAMPLES"
SHRINK_ENV = "FSDP_LOAD_CHECKS_GENERATED_SHRINK_LAUNCHES"
REPLAY_ENV = "FSDP_LOAD_CHECKS_GENERATED_REPLAY"

SEED = int(os.environ.get(SEED_ENV, "1"))
EXAMPLES = int(os.environ.get(EXAMPLES_ENV, "40"))  # draws; duplicates launch once (~30 distinct layouts)
SHRINK_LAUNCHES = int(os.environ.get(SHRINK_ENV, "10"))  # launches (rounds) shrinking may spend, only on failure
SHRINK_BATCH = 24  # candidates per shrink launch
CASE_TIMEOUT = 60.0

OK_STOCK = frozenset({Status.PASSED, Status.XFAILED, Status.SKIPPED})  # known upstream bugs are expected on the installed stack
OK_STRICT = frozenset({Status.PASSED, Status.SKIPPED})  # a patched loader gets no excuse (skipped: the memory check on tiny models)


# ---------------------------------------------------------------- drawing


def drive(fn, seed: int = SEED, examples: int = EXAMPLES) -> None:
    """Run `fn` over the layouts hypothesis draws from `seed`: the same sequence every time
    (no database, explicit seed), so a collecting pass and a checking pass see the same layouts
    until the first failure, after which hypothesis shrinks."""

    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=False,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
        report_multiple_bugs=False,
    )
    @hypothesis_seed(seed)
    @given(generated.layouts())
    def generated_layout(layout):
        fn(layout)

    generated_layout()


def draw(seed: int = SEED, examples: int = EXAMPLES) -> list[dict]:
    drawn: list[dict] = []
    drive(drawn.append, seed, examples)
    return drawn


def unique(layouts: list[dict]) -> list[dict]:
    return list({generated.layout_name(lay): lay for lay in layouts}.values())


# ---------------------------------------------------------------- launching


def needs_poison(loader: str) -> bool:
    """A regression whose garbage is only deterministic with --poison-uninitialized (regressions.py says which)."""
    return any(r.name == loader and r.poison for r in REGRESSIONS)


class Runs:
    """Verdicts per (loader, layout): one batch launch per loader, single launches only for new layouts."""

    def __init__(self, root: Path, mp: pytest.MonkeyPatch):
        self.root = root
        self.file = root / "layouts.json"
        self.known: dict[str, dict] = {}
        self.results: dict[str, dict[str, CaseResult]] = {}
        self.pending: dict[str, dict[str, dict]] = {}  # loader -> layouts a round asked about and no launch has run
        self.shrink_launches: Counter = Counter()
        self.shrink_batch: dict[str, int] = {}  # loader -> candidates per shrink launch, when below SHRINK_BATCH
        self.failures: dict[str, Path] = {}  # loader -> the last failing layout's JSON (hypothesis ends on the shrunk one)
        modules = [m for m in os.environ.get(catalogue.EXTRA_MODULES_ENV, "").split(",") if m.strip()]
        if generated.__name__ not in modules:
            modules.append(generated.__name__)
        mp.setenv(catalogue.EXTRA_MODULES_ENV, ",".join(modules))
        mp.setenv(generated.LAYOUTS_ENV, str(self.file))

    def _publish(self, layouts: list[dict]) -> list:
        """Every layout launched so far stays in the file: the reference process looks cases up by name."""
        for lay in layouts:
            self.known.setdefault(generated.layout_name(lay), lay)
        generated.write_layouts(self.file, list(self.known.values()))
        return [generated.layout_case(lay) for lay in layouts]

    def launch(self, plan: dict[str, list[dict]]) -> None:
        """One batch, whatever the loaders (one start-up, not one per loader): the first loader's layouts as
        themselves and last in the launch, the others' before them, as loader variants (records.Case.with_loader)."""
        first, *others = plan
        cases = [case.with_loader(loader, needs_poison(loader)) for loader in others for case in self._publish(plan[loader])]
        cases += self._publish(plan[first])
        cfg = LaunchConfig(nproc=2, loader=first, case_timeout_s=CASE_TIMEOUT, poison=needs_poison(first))
        for loader, results in runner.by_loader(cases, runner.run_batch(self.root, cases, cfg), first).items():
            self.results.setdefault(loader, {}).update(results)

    def batches(self, plan: dict[str, list[dict]]) -> None:
        """Each loader's layouts no launch has run yet, in one launch."""
        todo = {loader: [lay for lay in unique(layouts) if generated.layout_name(lay) not in self.results.get(loader, {})]
                for loader, layouts in plan.items()}
        todo = {loader: layouts for loader, layouts in todo.items() if layouts}
        if todo:
            self.launch(todo)

    def batch(self, loader: str, layouts: list[dict]) -> float:
        start = time.monotonic()
        self.batches({loader: layouts})
        return time.monotonic() - start

    def result(self, loader: str, layout: dict) -> CaseResult | None:
        """The verdicts, or None (and the layout noted as pending) when no launch has run it."""
        found = self.results.get(loader, {}).get(generated.layout_name(layout))
        if found is None:
            pending = self.pending.setdefault(loader, {})
            pending.setdefault(generated.layout_name(layout), layout)
        return found

    def save_failure(self, loader: str, layout: dict) -> Path:
        out = self.root / "failures" / loader / f"{generated.layout_name(layout)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(layout, indent=1, sort_keys=True) + "\n")
        self.failures[loader] = out
        return out


# ---------------------------------------------------------------- verdicts


def outcomes(layout: dict, result: CaseResult, loader: str) -> dict[str, Outcome]:
    """The layout's verdicts read against the known issues, which select generated layouts by their tags."""
    return known_issues.outcomes(result, generated.layout_case(layout), loader)


def replay_hint(layout: dict, path: Path | None, loader: str) -> str:
    where = f"{REPLAY_ENV}={path}" if path else f"{REPLAY_ENV}='{generated.canonical(layout)}'"
    return (
        f"replay this layout alone: {where} pytest tests/test_generated.py -k replay --loader {loader} -p no:randomly\n"
        f"(a layout drawn as is also replays as {REPLAY_ENV}={SEED}:gen-NAME; "
        f"the whole batch: {SEED_ENV}={SEED} {EXAMPLES_ENV}={EXAMPLES})"
    )


def failure_report(layout: dict, bad: dict[str, Outcome], loader: str, path: Path | None) -> str:
    where = (
        f"hypothesis seed {SEED}, {EXAMPLES} examples; hypothesis reports the shrunk layout last"
        if path
        else "replayed"
    )
    lines = [f"generated layout {generated.layout_name(layout)} fails with loader {loader!r} ({where}):"]
    for check, outcome in bad.items():
        lines.append(f"  [{check}] {outcome.status}: " + render.outcome_message(outcome).replace("\n", "\n      "))
    lines.append("layout: " + generated.canonical(layout))
    lines.append(replay_hint(layout, path, loader))
    return "\n".join(lines)


def property_for(runs: Runs, loader: str, ok: frozenset[str]):
    def check(layout: dict) -> None:
        result = runs.result(loader, layout)
        if result is None:  # not launched yet: "not failing" for this round, launched before the next
            return
        got = outcomes(layout, result, loader)
        bad = {check: o for check, o in got.items() if o.status not in ok}
        if bad:
            path = runs.save_failure(loader, layout)
            report = failure_report(layout, bad, loader, path)
            note(report)
            raise AssertionError(report)

    return check


def find_and_shrink(runs: Runs, loader: str, ok: frozenset[str], launches: int = SHRINK_LAUNCHES) -> AssertionError | None:
    """Hypothesis over the seed's layouts with `loader`; the shrunk failure, or None when every layout is fine."""
    while True:
        runs.pending[loader] = {}
        try:
            drive(property_for(runs, loader, ok))
            error = None
        except AssertionError as exc:
            error = exc
        todo = list(runs.pending[loader].values())
        if not todo:  # every answer was real: this is hypothesis's own result
            if error is not None:
                error.args = (f"{error.args[0]}\n(shrunk by hypothesis in {runs.shrink_launches[loader]} extra launches)",)
            return error
        if runs.shrink_launches[loader] >= launches:
            if error is not None:
                error.args = (
                    f"{error.args[0]}\n(shrinking stopped after {launches} extra launches, {len(todo)} candidates untried: "
                    f"the layout may not be minimal; raise {SHRINK_ENV} to go on)",
                )
            return error
        runs.shrink_launches[loader] += 1
        launch_dir = runs.root / "launches" / loader
        before = len(list(launch_dir.glob("launch-*"))) if launch_dir.exists() else 0
        runs.launch({loader: todo[: runs.shrink_batch.get(loader, SHRINK_BATCH)]})
        if len(list(launch_dir.glob("launch-*"))) - before > 2:
            # ranks that fail differently (one raises) cost a relaunch per case: fewer speculative candidates
            runs.shrink_batch[loader] = max(4, runs.shrink_batch.get(loader, SHRINK_BATCH) // 2)


def summary(runs: Runs, loader: str, layouts: list[dict]) -> Counter:
    counts: Counter = Counter()
    for lay in unique(layouts):
        for check, o in outcomes(lay, runs.results[loader][generated.layout_name(lay)], loader).items():
            counts[(check, o.status)] += 1
    return counts


def check_batch(runs: Runs, loader: str, layouts: list[dict], ok: frozenset[str]) -> None:
    elapsed = runs.batch(loader, layouts)
    print(f"\n{loader}: {len(unique(layouts))} layouts in one launch, {elapsed:.0f}s")
    for (check, status), n in sorted(summary(runs, loader, layouts).items()):
        print(f"  {check:<10} {status:<8} {n}")
    error = find_and_shrink(runs, loader, ok)
    if error is not None:
        raise error
    # the property saw exactly the batch's layouts: nothing launched on its own unless something failed
    assert runs.shrink_launches[loader] == 0, "hypothesis drew layouts the batch did not have: drawing is not deterministic"


def replay_layouts(raw: str) -> list[dict]:
    raw = raw.strip()
    if raw.startswith(("{", "[")):
        parsed = json.loads(raw)
        return [parsed] if isinstance(parsed, dict) else parsed
    if ":" in raw and not Path(raw).exists():
        seed, _, name = raw.partition(":")
        found = [lay for lay in draw(int(seed)) if generated.layout_name(lay) == name]
        if not found:
            raise pytest.UsageError(f"{REPLAY_ENV}={raw}: seed {seed} ({EXAMPLES} examples) draws no layout {name}")
        return found[:1]
    return generated.read_layouts(raw)


def weight(layout: dict) -> tuple[int, int]:
    """How big a layout is: (tensors + modules + ties + aliases + dropped keys, total elements)."""
    specs = generated.tensor_specs(layout)
    parts = len(specs) + len(layout["modules"]) + len(layout["ties"]) + len(layout["shared"]) + len(layout["drop_keys"])
    return parts, sum(math.prod(s["shape"]) for s in specs.values()) + layout["vocab_size"] * layout["hidden_size"]


