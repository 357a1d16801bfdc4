"""The zoo in one batched launch vs one launch per case, in one process, on this machine.

    python benchmarks/speed.py [--nproc 2 8] [--cases PATTERN | --toy] [--rounds 3]

By default every zoo case (what `fsdp-load-checks zoo` runs: toy, arch-*,
big-*, every accelerate config), so the ratio is the one a user of `zoo`
gets; at --nproc 8 on 2 cores that is ~1 h, almost all of it the one launch
per case. `--toy` is the 17 toy cases of the earlier figures (~10 min): with
few cases the launch start-up is amortised over fewer of them, so its ratio is
lower (N(F + c) / (F + Nc) for N cases, start-up F, a case's own work c).

Checkpoints and single-process references are built once up front and
shared by both modes (the suite builds them once per run either way), so
the figures compare launches only: torchrun start-up, N imports of torch +
transformers + accelerate per launch, and the cases themselves.

This machine's speed drifts by up to 1.5x within minutes (other tenants), and
one batched launch is a single sample of it: the same code measured 7.8x,
9.0x and 10.4x at 8 ranks in three back-to-back runs. So the modes are
interleaved: --rounds batched launches, each followed by its share of the
one-launch-per-case launches, and the speed-up is the per-case total over the
median batched launch; the spread of the batched launches is printed beside
it. Then, per --nproc, where the median batched launch's time went: each
phase's wall time (`Observation.seconds`), slowest and fastest rank, summed
over cases.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsdp_load_checks import catalogue  # noqa: E402
from fsdp_load_checks.parent import runner, stop  # noqa: E402
from fsdp_load_checks.records import LaunchConfig  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def phase_breakdown(runs: dict) -> dict[str, tuple[float, float]]:
    """phase -> (seconds summed over cases of the slowest rank's time in it, the same for the fastest rank).

    The slowest rank sets a case's wall time; the gap to the fastest is time spent waiting in collectives.
    """
    totals: dict[str, list[float]] = {}
    for run in runs.values():
        phases = dict.fromkeys(p for obs in run.observations.values() for p in obs.seconds)
        for phase in phases:
            figures = [obs.seconds.get(phase, 0.0) for obs in run.observations.values()]
            slow_fast = totals.setdefault(phase, [0.0, 0.0])
            slow_fast[0] += max(figures)
            slow_fast[1] += min(figures)
    return {p: (v[0], v[1]) for p, v in totals.items()}


def print_breakdown(nproc: int, runs: dict, wall: float) -> None:
    breakdown = phase_breakdown(runs)
    accounted = sum(slow for slow, _ in breakdown.values())
    print(f"  per-phase wall time, batched launch at --nproc {nproc}, {len(runs)} cases "
          f"(slowest rank / fastest rank, summed over cases; {accounted:.1f} s of {wall:.1f} s accounted):")
    for phase, (slow, fast) in sorted(breakdown.items(), key=lambda kv: -kv[1][0]):
        print(f"    {phase:<20} {slow:>8.1f} s {fast:>8.1f} s {100 * slow / max(wall, 1e-9):>6.1f}%")


def all_complete(runs: dict, world: int) -> bool:
    return all(len(r.observations) == world and not r.lost for r in runs.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=3,
                        help="batched launches per --nproc, interleaved with the one-launch-per-case ones (median)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cases", default=None, help="case names or globs, comma-separated (default: every zoo case)")
    which.add_argument("--toy", action="store_true",
                       help="the 17 toy cases of the earlier figures: every toy case but big-*, default config only")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.toy:  # the @bf16 twins would share the launch, but change the set
        selected = [c for c in catalogue.all_cases().values()
                    if not c.name.startswith(("arch-", "big-")) and "@" not in c.name]
    else:
        selected = catalogue.select(pattern=args.cases)  # no pattern: every zoo case, as `fsdp-load-checks zoo`
    if not selected:
        parser.error(f"--cases {args.cases!r} matches no case; `fsdp-load-checks list` names them")
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="fsdp-speed-"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"{len(selected)} cases; building checkpoints and references once ...", flush=True)
    runner.materialize(root, selected, timeout_s=1800)
    tasks = [runner.task_for(root, c) for c in selected]
    print(f"{'nproc':>5} {'batched s':>10} {'(spread)':>13} {'one case s':>10} {'per-case s':>11} {'speed-up':>9} "
          f"{'marginal s/case':>16}")
    breakdowns = []
    for nproc in args.nproc:
        cfg = LaunchConfig(nproc=nproc, case_timeout_s=300, startup_timeout_s=600)
        work = root / f"n{nproc}"
        batched: list[tuple[float, dict]] = []
        per_case_runs: dict = {}
        per_case_s = 0.0
        shares = [tasks[i::args.rounds] for i in range(args.rounds)]  # round i's share of the single launches
        for share in shares:
            runs: dict = {}
            batched.append((timed(lambda: runs.update(runner.run_tasks(tasks, cfg, work / "batched"))), runs))
            for t in share:
                per_case_s += timed(lambda: per_case_runs.update(runner.run_tasks([t], cfg, work / "single")))
        one = timed(lambda: runner.run_tasks(tasks[:1], cfg, work / "one"))
        walls = sorted(wall for wall, _ in batched)
        median = statistics.median(walls)
        ok = all(all_complete(runs, nproc) for _, runs in batched) and all_complete(per_case_runs, nproc)
        marginal = (median - one) / max(len(tasks) - 1, 1)
        spread = f"{walls[0]:.1f}-{walls[-1]:.1f}"
        print(
            f"{nproc:>5} {median:>10.1f} {spread:>13} {one:>10.1f} {per_case_s:>11.1f} {per_case_s / median:>8.1f}x "
            f"{marginal:>16.2f}" + ("" if ok else "   (some case did not complete: figures invalid)"),
            flush=True,
        )
        wall, runs = min(batched, key=lambda b: abs(b[0] - median))
        breakdowns.append((nproc, runs, wall))
    for nproc, runs, wall in breakdowns:
        print_breakdown(nproc, runs, wall)
    print(f"benchmark: {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(stop.run_stoppable(main, Path(__file__).name))  # a signal ends every launch it started
