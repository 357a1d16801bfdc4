"""The harness under faults: a rank that raises, dies or hangs is named, its neighbours keep their verdicts,
and nothing is left running. Real torchrun, real gloo process groups, real FSDP2 loading."""

from __future__ import annotations

import time

import psutil
import pytest

from fsdp_load_checks import catalogue, render
from fsdp_load_checks.parent import runner
from fsdp_load_checks.records import LaunchConfig, LostHow, Phase

CASE_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def faulty_batch(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv(catalogue.EXTRA_MODULES_ENV, "tests.fault_cases")
    try:
        names = [c.name for c in catalogue.select(pattern="fault-*")]
        root = tmp_path_factory.mktemp("faults")
        cfg = LaunchConfig(nproc=2, case_timeout_s=CASE_TIMEOUT)
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        start = time.monotonic()
        results = runner.run_batch(root, catalogue.select(names), cfg)
        elapsed = time.monotonic() - start
        leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        yield results, elapsed, leftover, root
    finally:
        mp.undo()


def problems(results, case):
    return render.lines(results[case].verdicts["buffers"])


def test_a_rank_that_raises_is_named_with_its_exception(faulty_batch):
    results, *_ = faulty_batch
    lines = problems(results, "fault-raise")
    assert lines[0] == (
        "fault-raise: rank 1 raised RuntimeError: injected fault on rank 1 during fsdp2_prepare (during fsdp2_prepare)"
    )
    assert "injected fault" in results["fault-raise"].verdicts["buffers"].details  # the rank's traceback


def test_a_rank_that_dies_is_named_with_its_exit_code(faulty_batch):
    results, *_ = faulty_batch
    assert "fault-exit: rank 1 died during observe of fault-exit, exit code 7" in problems(results, "fault-exit")


def test_a_rank_killed_by_a_signal_is_named_with_the_signal(faulty_batch):
    results, *_ = faulty_batch
    lines = problems(results, "fault-abort")
    assert lines[0].startswith("fault-abort: rank 0 died during forward of fault-abort, exit code -6"), lines
    assert "SIGABRT" in lines[0]


def test_a_rank_that_hangs_is_killed_and_named_with_its_phase(faulty_batch):
    results, *_ = faulty_batch
    lines = problems(results, "fault-hang")
    assert lines[0].startswith(f"fault-hang: rank 1 hung for more than {CASE_TIMEOUT:g}s")
    assert "during observe of fault-hang" in lines[0]
    lost = results["fault-hang"].run.lost[0]
    assert (lost.rank, lost.how, lost.phase, lost.timeout_s) == (1, LostHow.HUNG, Phase.OBSERVE, CASE_TIMEOUT)
    assert "Thread" in results["fault-hang"].run.lost[0].log_tail or "File" in results["fault-hang"].run.lost[0].log_tail


def test_cases_around_a_fault_keep_their_verdicts(faulty_batch):
    results, *_ = faulty_batch
    for case in ("fault-none-before", "fault-none-middle", "fault-none-after"):
        failed = [line for v in results[case].verdicts.values() if not v.passed for line in render.lines(v)]
        assert failed == [], (case, failed)


def test_each_fault_costs_one_relaunch_only_the_hang_waits_its_timeout_and_no_process_is_left(faulty_batch):
    results, elapsed, leftover, _ = faulty_batch
    # load-independent: a launch per fault plus the first (the cases after each fault are relaunched once,
    # nothing is retried) and the case timeout fired for the hanging case only
    launches = {r.run.launch_dir for r in results.values()}
    assert len(launches) == 1 + sum(1 for c in results if c.startswith("fault-") and "none" not in c), launches
    hung = [c for c, r in results.items() if any(lost.how is LostHow.HUNG for lost in r.run.lost)]
    assert hung == ["fault-hang"], hung
    assert leftover == []
    print(f"{len(results)} cases, {len(launches)} launches, one {CASE_TIMEOUT:g}s hang: {elapsed:.0f}s")
