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

from fsdp_load_checks import catalogue, render
from fsdp_load_checks.checks import CHECKS
from fsdp_load_checks.parent import runner
from fsdp_load_checks.records import LaunchConfig, LostHow, LostRank, NotRun, Phase

# a healthy case takes ~1 s on a rank here; 8 s leaves room on a loaded machine before rank 0, still
# loading, would itself be the rank furthest behind
CASE_TIMEOUT = 8.0
HANG_BUDGET = LaunchConfig().hang_budget  # the default both front ends use


def run_hung_batch(root):
    """The batch, timed: (results, case names, seconds, launch directories, processes left behind)."""
    cases = catalogue.select(pattern="hang-every-*")
    cfg = LaunchConfig(nproc=2, case_timeout_s=CASE_TIMEOUT)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    start = time.monotonic()
    results = runner.run_batch(root, cases, cfg)
    elapsed = time.monotonic() - start
    leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    launches = sorted((root / "launches" / cfg.loader).glob("launch-*"))
    print(f"{len(cases)} cases hanging in every launch, --fsdp-timeout {CASE_TIMEOUT:g}: {elapsed:.1f}s, "
          f"{len(launches)} launches of {launch_seconds(launches):.1f}s in all")  # the README's figure (pytest -s)
    return results, [c.name for c in cases], elapsed, launches, leftover


def launch_seconds(launches) -> float:
    """How long the launches ran: from each one's spec.json to the last file its ranks wrote (stack dumps)."""
    return sum(max(f.stat().st_mtime for f in d.iterdir()) - (d / "spec.json").stat().st_mtime for d in launches)


# One test, not one per assertion: a module fixture would run the batch again in every xdist worker
# that is handed one of its tests.
def test_every_case_hanging_inside_accelerate_costs_the_budget_and_each_story_names_rank_1(tmp_path, monkeypatch):
    monkeypatch.setenv(catalogue.EXTRA_MODULES_ENV, "tests.fault_cases")
    results, names, elapsed, launches, leftover = run_hung_batch(tmp_path)
    hung, left = names[:HANG_BUDGET], names[HANG_BUDGET:]

    # the cost: the budget's launches, none for the cases left (their seconds are printed, not bounded: load decides them)
    assert len(names) >= 10
    assert len(launches) == HANG_BUDGET, launches
    assert leftover == []

    # a hang inside accelerate is blamed on the rank that hung alone, with the peer's collective
    for case in hung:
        lost = results[case].run.lost
        assert [(x.rank, x.how, x.phase) for x in lost] == [
            (1, LostHow.HUNG, Phase.FSDP2_PREPARE), (0, LostHow.BLOCKED, Phase.FSDP2_PREPARE)
        ], [render.lost_line(x) for x in lost]
        assert render.lines(results[case].verdicts["buffers"]) == [
            f"{case}: rank 1 hung for more than {CASE_TIMEOUT:g}s (killed; Python stacks in its log) "
            f"during fsdp2_prepare of {case} (rank 0 waiting for it in broadcast)",
            f"{case}: rank 0 was blocked waiting for rank 1 in broadcast (killed) during fsdp2_prepare of {case}",
        ]

    # the cases left say why they did not run, with the first hang's story
    story = render.lost_line(results[hung[0]].run.lost[0])
    for case in left:
        for check, verdict in results[case].verdicts.items():
            assert render.lines(verdict) == [
                f"{case}: not run: the previous {HANG_BUDGET} cases hung in fsdp2_prepare; the first: {story}"
            ], check

    # the CLI: one line per hung case, one for all the cases not run
    from fsdp_load_checks import cli

    cases = catalogue.select(names)
    lines = cli.failure_lines(cases, results, cli.report_rows(cases, results, "stock"), list(CHECKS))
    assert [label for label, _ in lines] == [
        *(f"{c}/{','.join(CHECKS)}" for c in hung), f"{', '.join(left)} (every check of {len(left)} cases)"
    ]
    assert lines[-1][1] == f"not run: the previous {HANG_BUDGET} cases hung in fsdp2_prepare; the first: {story}"


def test_the_budget_counts_hangs_per_phase():
    def hang(phase: Phase, case: str) -> LostRank:
        return LostRank(1, case, phase, LostHow.HUNG, None, "")

    budget = runner.HangBudget(2)
    assert budget.spend(hang(Phase.FSDP2_PREPARE, "a")) is None
    assert budget.spend(hang(Phase.OBSERVE, "b")) is None  # another phase: its own count
    spent = budget.spend(hang(Phase.FSDP2_PREPARE, "c"))
    assert spent == NotRun(Phase.FSDP2_PREPARE, 2, hang(Phase.FSDP2_PREPARE, "a"))
    assert runner.HangBudget(1).spend(hang(Phase.OBSERVE, "a")) is not None
