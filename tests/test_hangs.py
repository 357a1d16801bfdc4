"""A regression that hangs every case costs its hang budget, not a launch per case, and the rank behind
each hang is named, even inside accelerate's own code.

One batch of ten cases, real torchrun and gloo, in which rank 1 of every case sleeps inside accelerate's
`fsdp2_prepare_model`, just before `fsdp2_load_full_state_dict`'s broadcasts, while rank 0 blocks in the
first broadcast. No progress tick tells the two ranks apart there (both are in fsdp2_prepare): only their
stacks do. With the default hang budget (2) the batch takes two launches; the eight cases left are
reported not run, with the first hang's story.
"""

from __future__ import annotations

import time

import psutil
import pytest

from fsdp_load_checks import catalogue, render
from fsdp_load_checks.checks import CHECKS
from fsdp_load_checks.parent import runner
from fsdp_load_checks.records import LaunchConfig, LostHow, LostRank, NotRun, Phase

# a healthy case takes ~1 s on a rank here; 8 s leaves room on a loaded machine before rank 0, still
# loading, would itself be the rank furthest behind
CASE_TIMEOUT = 8.0
HANG_BUDGET = LaunchConfig().hang_budget  # the default both front ends use
# what one launch may take on a loaded 2-core machine besides the case timeout: torchrun, imports, the stack dump
LAUNCH_OVERHEAD_S = 40.0


@pytest.fixture(scope="module")
def hung_batch(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv(catalogue.EXTRA_MODULES_ENV, "tests.fault_cases")
    try:
        cases = catalogue.select(pattern="hang-every-*")
        root = tmp_path_factory.mktemp("hangs")
        cfg = LaunchConfig(nproc=2, case_timeout_s=CASE_TIMEOUT)
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        start = time.monotonic()
        results = runner.run_batch(root, cases, cfg)
        elapsed = time.monotonic() - start
        leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        launches = sorted((root / "launches" / cfg.loader).glob("launch-*"))
        print(f"{len(cases)} cases hanging in every launch, --fsdp-timeout {CASE_TIMEOUT:g}: {elapsed:.1f}s, "
              f"{len(launches)} launches")  # the README's figure (pytest -s)
        yield results, [c.name for c in cases], elapsed, launches, leftover
    finally:
        mp.undo()


def test_a_hang_inside_accelerate_is_blamed_on_that_rank_alone(hung_batch):
    results, names, *_ = hung_batch
    for case in names[:HANG_BUDGET]:
        lost = results[case].run.lost
        assert [(x.rank, x.how, x.phase) for x in lost] == [
            (1, LostHow.HUNG, Phase.FSDP2_PREPARE), (0, LostHow.BLOCKED, Phase.FSDP2_PREPARE)
        ], [render.lost_line(x) for x in lost]
        assert render.lines(results[case].verdicts["buffers"]) == [
            f"{case}: rank 1 hung for more than {CASE_TIMEOUT:g}s (killed; Python stacks in its log) "
            f"during fsdp2_prepare of {case} (rank 0 waiting for it in broadcast)",
            f"{case}: rank 0 was blocked waiting for rank 1 in broadcast (killed) during fsdp2_prepare of {case}",
        ]


def test_an_every_case_hang_costs_its_budget_not_a_launch_per_case(hung_batch):
    _, names, elapsed, launches, leftover = hung_batch
    assert len(names) >= 10
    assert len(launches) == HANG_BUDGET, launches  # none for the eight cases left
    assert elapsed < (HANG_BUDGET + 1) * (CASE_TIMEOUT + LAUNCH_OVERHEAD_S), elapsed
    assert leftover == []


def test_the_cases_left_are_not_run_and_say_why(hung_batch):
    results, names, *_ = hung_batch
    story = render.lost_line(results[names[0]].run.lost[0])
    for case in names[HANG_BUDGET:]:
        for check, verdict in results[case].verdicts.items():
            assert render.lines(verdict) == [
                f"{case}: not run: the previous {HANG_BUDGET} cases hung in fsdp2_prepare; the first: {story}"
            ], check


def test_the_cli_gives_a_hung_case_one_line_and_the_cases_not_run_one_between_them(hung_batch):
    from fsdp_load_checks import cli

    results, names, *_ = hung_batch
    cases = catalogue.select(names)
    lines = cli.failure_lines(cases, results, cli.report_rows(cases, results, "stock"), list(CHECKS))
    hung, left = names[:HANG_BUDGET], names[HANG_BUDGET:]
    assert [label for label, _ in lines] == [
        *(f"{c}/{','.join(CHECKS)}" for c in hung), f"{', '.join(left)} (every check of {len(left)} cases)"
    ]
    said = f"not run: the previous {HANG_BUDGET} cases hung in fsdp2_prepare; the first: rank 1 hung"
    assert lines[-1][1].startswith(said), lines[-1]


def test_the_budget_counts_hangs_per_phase():
    def hang(phase: Phase, case: str) -> LostRank:
        return LostRank(1, case, phase, LostHow.HUNG, None, "")

    budget = runner.HangBudget(2)
    assert budget.spend(hang(Phase.FSDP2_PREPARE, "a")) is None
    assert budget.spend(hang(Phase.OBSERVE, "b")) is None  # another phase: its own count
    spent = budget.spend(hang(Phase.FSDP2_PREPARE, "c"))
    assert spent == NotRun(Phase.FSDP2_PREPARE, 2, hang(Phase.FSDP2_PREPARE, "a"))
    assert runner.HangBudget(1).spend(hang(Phase.OBSERVE, "a")) is not None
