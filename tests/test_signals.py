"""A signal to either front end, at any stage, ends every process the run started within 10 s, says so in
one line and exits non-zero (the CLI 128 + N, with the verdicts complete by then in its report).

Each run is held at its stage by a case from tests/fault_cases.py, so the signal lands there every time:
`signal-building` (the reference process never gets its config; the CLI is signalled as soon as that
process starts), `signal-launching` (rank 0 sleeps before importing torch), `signal-midcase` (rank 0
sleeps in observe; with two ranks, rank 1 blocks in a gather). The process tree is recorded by pid
before the signal, with the pid every rank wrote in its progress file, and each of those must be gone
10 s after it. The three CLI runs go at once; the pytest run holds all three stages at once, one per
xdist worker (-n 3, one item each), and the signal goes to its controller. Only the CLI's mid-case run
has two ranks (the issue's reproduction); the others use one, since every rank lives in a session of
its own either way and each costs a few CPU-seconds of imports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fsdp_load_checks.parent.stop import alive, exit_code
from fsdp_load_checks.parent.watchdog import read_progress

REPO = Path(__file__).resolve().parent.parent
GONE_WITHIN_S = 10.0  # the guarantee
STAGE_TIMEOUT_S = 300.0  # reaching a stage on a loaded 2-core machine (imports, reference, torchrun)


class Run:
    """One front end started in its own session, watched until its stage, then signalled."""

    def __init__(self, name: str, cmd: list[str], root: Path, stage: str, sig: signal.Signals, nproc: int):
        self.name, self.root, self.stage, self.sig, self.nproc = name, root, stage, sig, nproc
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not this run's xdist worker
        env.update(FSDP_LOAD_CHECKS_CASE_MODULES="tests.fault_cases",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.tree: list[psutil.Process] = []
        self.names: dict[int, str] = {}  # pid -> command, as recorded
        self.signalled_at = 0.0
        self.gone_s: float | None = None
        self.exit_s: float | None = None
        self.stdout = self.stderr = ""

    def launches(self, case: str) -> list[Path]:
        out = []
        for d in self.root.glob("launches/*/launch-*"):
            try:
                if case in (d / "spec.json").read_text(errors="ignore"):
                    out.append(d)
            except FileNotFoundError:  # made, its spec not written yet: the launch has not started
                pass
        return out

    def progress(self, case: str) -> list[dict]:
        out = []
        for d in self.launches(case):
            for f in d.glob("rank*.progress"):
                state = read_progress(d, int(f.name.removeprefix("rank").removesuffix(".progress")))
                if state is not None:
                    out.append(state)
        return out

    def reached(self, stage: str) -> bool:
        """Whether the run holds `stage` (of the case named after it)."""
        if stage == "building":  # its reference process started: `python -m fsdp_load_checks.reference ROOT CASE...`
            below = psutil.Process(self.proc.pid).children(recursive=True)
            return any({"fsdp_load_checks.reference", "signal-building"} <= set(_argv(p)) for p in below)
        if stage == "launching":  # every rank started, none in a case yet
            states = self.progress("signal-launching")
            return len(states) == self.nproc and all(s["phase"] == "startup" for s in states)
        states = self.progress("signal-midcase")  # mid-case: every rank in observe
        here = [s for s in states if (s["case"], s["phase"]) == ("signal-midcase", "observe")]
        return len(here) == len(states) == self.nproc

    def record(self, case_pids: list[int]) -> None:
        """The process tree by pid, before the signal: the front end's descendants and every rank's own pid."""
        top = psutil.Process(self.proc.pid)
        self.tree = [top, *top.children(recursive=True)]
        known = {p.pid for p in self.tree}
        self.tree += [psutil.Process(pid) for pid in case_pids if pid not in known and psutil.pid_exists(pid)]
        self.names = {p.pid: " ".join(p.cmdline()[1:4]) for p in self.tree}

    def signal(self) -> None:
        self.signalled_at = time.monotonic()
        self.proc.send_signal(self.sig)

    def poll(self) -> bool:
        """True once the front end has exited and every recorded process is gone."""
        now = time.monotonic() - self.signalled_at
        if self.gone_s is None and not any(alive(p) for p in self.tree[1:]):
            self.gone_s = now
        if self.exit_s is None and self.proc.poll() is not None:
            self.exit_s = now
        return self.gone_s is not None and self.exit_s is not None

    def finish(self) -> None:
        self.stdout, self.stderr = self.proc.communicate(timeout=60)

    def kill(self) -> None:
        """Test cleanup after a failure: the run's processes by pid, and the front end's group.

        Those recorded at the signal, and those alive now (a test that failed before its signal recorded none):
        the front end's descendants and every rank that wrote its pid. Ranks and torchrun agents live in
        sessions of their own, out of the front end's group's reach."""
        found = list(self.tree)
        try:
            top = psutil.Process(self.proc.pid)
            found += [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
        for pid in rank_pids(self):
            try:
                rank = psutil.Process(pid)
                if "fsdp_load_checks.rank" in _argv(rank):  # this run's rank, not a process that reused its pid
                    found.append(rank)
            except psutil.NoSuchProcess:
                pass
        for p in found:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def _argv(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def rank_pids(run: Run) -> list[int]:
    return [int(s["pid"]) for case in ("signal-launching", "signal-midcase") for s in run.progress(case)]


def drive(runs: list[Run], stages: dict[str, list[str]]) -> None:
    """Wait until each run holds all its stages, record its tree and signal it; then watch until all are gone."""
    waiting, signalled = list(runs), []
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    while waiting:
        for run in list(waiting):
            if all(run.reached(s) for s in stages[run.name]):
                run.record(rank_pids(run))
                run.signal()
                waiting.remove(run)
                signalled.append(run)
            elif run.proc.poll() is not None:
                pytest.fail(f"{run.name} exited before its stage: {run.proc.communicate()}")
        for run in signalled:  # timed while the others still wait for their stage
            run.poll()
        assert time.monotonic() < deadline, [r.name for r in waiting]
        time.sleep(0.01 if signalled else 0.1)  # fine-grained only while timing
    deadline = time.monotonic() + GONE_WITHIN_S + 50  # the front ends may take longer to exit than their children
    while not all(run.poll() for run in runs) and time.monotonic() < deadline:
        time.sleep(0.01)
    for run in runs:
        run.finish()


def assert_stopped(run: Run) -> None:
    left = [f"{p.pid} {run.names.get(p.pid)}" for p in run.tree if alive(p)]
    assert left == [], f"{run.name}: still alive {run.sig.name}: {left}"
    assert run.gone_s is not None and run.gone_s < GONE_WITHIN_S, (run.name, run.gone_s)
    assert run.proc.returncode == exit_code(run.sig), (run.name, run.proc.returncode, run.stderr[-3000:])
    # the figures the README quotes (shown with pytest -s)
    print(f"{run.name} {run.sig.name}: {len(run.tree) - 1} processes gone {run.gone_s:.2f}s after the signal, "
          f"front end exited after {run.exit_s:.2f}s")


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_the_cli_stopped_at_each_stage_ends_everything_and_reports_what_was_complete(tmp_path):
    # stage, signal, ranks, cases; mid-case runs a passing case first, so the report has a verdict to keep
    plan = [("building", signal.SIGTERM, 1, "signal-building"), ("launching", signal.SIGHUP, 1, "signal-launching"),
            ("midcase", signal.SIGINT, 2, "fault-none-before,signal-midcase")]
    runs = []
    try:
        for stage, sig, nproc, cases in plan:
            root = tmp_path / stage
            root.mkdir()
            cmd = [sys.executable, "-m", "fsdp_load_checks.cli", "zoo", "--nproc", str(nproc), "--fsdp-cases", cases,
                   "--work-dir", str(root), "--json", str(root / "report.json")]
            runs.append(Run(f"cli-{stage}", cmd, root, stage, sig, nproc))
        drive(runs, {r.name: [r.stage] for r in runs})
    finally:
        for run in runs:
            if run.proc.returncode is None:
                run.kill()
    for run in runs:
        assert_stopped(run)
        line = one_line(run.stderr)
        said = f"fsdp-load-checks: stopped by {run.sig.name}; every process the run started was ended"
        assert line.startswith(said), line
        report = json.loads((run.root / "report.json").read_text())
        assert report["complete"] is False and report["passed"] is False, report
        done = {case["case"]: case["status"] for case in report["cases"]}
        if run.stage == "midcase":
            assert list(done) == ["fault-none-before"] and report["unfinished"] == ["signal-midcase"], report
            statuses = done["fault-none-before"]  # memory is skipped: a tiny model
            assert statuses == {"no-nan": "passed", "buffers": "passed", "parameters": "passed", "forward": "passed",
                                "memory": "skipped", "state-dict": "passed", "train-step": "passed"}, statuses
        else:
            assert done == {} and report["unfinished"] == [f"signal-{run.stage}"], report


def test_pytest_stopped_with_a_worker_at_each_stage_ends_everything(tmp_path):
    # --dist load: one item per worker (the project's loadfile would give the one module to one worker)
    cmd = [sys.executable, "-m", "pytest", str(REPO / "tests" / "test_zoo.py"), "-n", "3", "--dist", "load", "-q",
           "-p", "no:cacheprovider",
           "--nproc", "1", "--fsdp-batch-size", "1", "-k", "no-nan", "--basetemp", str(tmp_path / "base"),
           "--fsdp-cases", "signal-building,signal-launching,signal-midcase"]  # one item per case, one per worker
    run = Run("pytest -n 3", cmd, tmp_path / "base" / "fsdp-load-checks", "all", signal.SIGTERM, nproc=1)
    try:
        drive([run], {run.name: ["midcase", "launching", "building"]})  # the cheapest check first
    finally:
        if run.proc.returncode is None:
            run.kill()
    assert_stopped(run)
    line = one_line(run.stderr)
    assert line == "fsdp-load-checks: stopped by SIGTERM; every process the run started was ended", line
    # the tree held three xdist workers, a reference process, two torchrun agents and their ranks
    assert len(run.tree) >= 1 + 3 + 1 + 2 + 2, run.names
