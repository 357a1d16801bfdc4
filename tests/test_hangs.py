"""Hangs cost minutes, not hours, and the rank behind one is named, even inside accelerate's own code.

One batch, real torchrun and gloo: `hang-in-accelerate` (rank 1 sleeps inside
accelerate's `fsdp2_prepare_model`, before `fsdp2_load_full_state_dict`'s
broadcasts; no progress tick tells the ranks apart there, only their stacks),
then ten cases that each hang in observe (rank 1 never joins the gather).
With the default hang budget (2) the batch takes three launches: the hang in
fsdp2_prepare does not count against observe's budget, and after two hangs in
observe the eight cases left are reported not run, without a launch each.
"""

from __future__ import annotations

import time

import psutil
import pytest

from fsdp_load_checks import catalogue, render
from fsdp_load_checks.parent import runner
from fsdp_load_checks.records import LaunchConfig, LostHow, Phase

CASE_TIMEOUT = 5.0
HANG_BUDGET = LaunchConfig().hang_budget  # the default both front ends use
# what one launch may take on a loaded 2-core machine besides the case timeout: torchrun, imports, the stack dump
LAUNCH_OVERHEAD_S = 40.0


@pytest.fixture(scope="module")
def hung_batch(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv(catalogue.EXTRA_MODULES_ENV, "tests.fault_cases")
    try:
        cases = catalogue.select(pattern="hang-*")
        root = tmp_path_factory.mktemp("hangs")
        cfg = LaunchConfig(nproc=2, case_timeout_s=CASE_TIMEOUT)
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        start = time.monotonic()
        results = runner.run_batch(root, cases, cfg)
        elapsed = time.monotonic() - start
        leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        launches = sorted((root / "launches" / cfg.loader).glob("launch-*"))
        yield results, [c.name for c in cases], elapsed, launches, leftover
    finally:
        mp.undo()


def test_a_hang_inside_accelerate_is_blamed_on_that_rank_alone(hung_batch):
    results, *_ = hung_batch
    lost = results["hang-in-accelerate"].run.lost
    assert [(x.rank, x.how, x.phase) for x in lost] == [
        (1, LostHow.HUNG, Phase.FSDP2_PREPARE), (0, LostHow.BLOCKED, Phase.FSDP2_PREPARE)
    ], [render.lost_line(x) for x in lost]
    lines = render.lines(results["hang-in-accelerate"].verdicts["buffers"])
    assert lines == [
        f"hang-in-accelerate: rank 1 hung for more than {CASE_TIMEOUT:g}s (killed; Python stacks in its log) "
        "during fsdp2_prepare of hang-in-accelerate (rank 0 waiting for it in broadcast)",
        "hang-in-accelerate: rank 0 was blocked waiting for rank 1 in broadcast (killed) "
        "during fsdp2_prepare of hang-in-accelerate",
    ]


def test_an_every_case_hang_stops_after_the_budget_and_names_the_first(hung_batch):
    results, names, *_ = hung_batch
    hung = names[1 : 1 + HANG_BUDGET]
    for case in hung:
        first = results[case].run.lost[0]
        assert (first.rank, first.how, first.phase, first.waited_by) == (1, LostHow.HUNG, Phase.OBSERVE, (0,))
    story = render.lost_line(results[hung[0]].run.lost[0])
    for case in names[1 + HANG_BUDGET :]:
        for check, verdict in results[case].verdicts.items():
            assert render.lines(verdict) == [
                f"{case}: not run: the previous {HANG_BUDGET} cases hung in observe; the first: {story}"
            ], check
    assert f"of {hung[0]} (rank 0 waiting for it in full_tensor)" in story


def test_an_every_case_hang_costs_its_budget_not_a_launch_per_case(hung_batch):
    _, names, elapsed, launches, leftover = hung_batch
    assert len(names) >= 11
    # one launch for the hang in fsdp2_prepare, HANG_BUDGET for observe's; none for the 8 cases left
    assert len(launches) == 1 + HANG_BUDGET, launches
    assert elapsed < (1 + HANG_BUDGET) * (CASE_TIMEOUT + LAUNCH_OVERHEAD_S), elapsed
    assert leftover == []


def test_the_cli_gives_a_crashed_case_one_line_and_the_cases_not_run_one_between_them(hung_batch):
    from fsdp_load_checks import cli
    from fsdp_load_checks.checks import CHECKS

    results, names, *_ = hung_batch
    cases = catalogue.select(names)
    lines = cli.failure_lines(cases, results, cli.report_rows(cases, results, "stock"), list(CHECKS))
    every = ",".join(CHECKS)
    hung = names[: 1 + HANG_BUDGET]
    assert [label for label, _ in lines] == [
        *(f"{case}/{every}" for case in hung), f"{', '.join(names[1 + HANG_BUDGET :])} (every check)"
    ]
    assert lines[-1][1].startswith(f"not run: the previous {HANG_BUDGET} cases hung in observe; the first: rank 1 hung")
