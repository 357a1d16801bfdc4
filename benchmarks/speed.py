"""Batched launches vs one launch per case, in one process, on this machine.

    python benchmarks/speed.py [--nproc 2 8] [--cases PATTERN]

Checkpoints and single-process references are built once up front and
shared by both modes (the suite builds them once per run either way), so
the figures compare launches only: torchrun start-up, N imports of torch +
transformers + accelerate per launch, and the cases themselves.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsdp_load_checks import catalogue  # noqa: E402
from fsdp_load_checks.parent import runner  # noqa: E402
from fsdp_load_checks.records import LaunchConfig  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def all_complete(runs: dict, world: int) -> bool:
    return all(len(r.observations) == world and not r.lost for r in runs.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--cases", default=None, help="case filter (default: every toy case but the big-* size class)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    selected = catalogue.select(pattern=args.cases) if args.cases else [
        c for c in catalogue.all_cases().values() if not c.name.startswith(("arch-", "big-"))
    ]
    root = Path(tempfile.mkdtemp(prefix="fsdp-speed-"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"{len(selected)} cases; building checkpoints and references once ...", flush=True)
    runner.materialize(root, selected, timeout_s=1800)
    tasks = [runner.task_for(root, c) for c in selected]
    print(f"{'nproc':>5} {'batched s':>10} {'one case s':>10} {'per-case s':>11} {'speed-up':>9} {'marginal s/case':>16}")
    for nproc in args.nproc:
        cfg = LaunchConfig(nproc=nproc, case_timeout_s=300, startup_timeout_s=600)
        work = root / f"n{nproc}"
        batched_runs: dict = {}
        batched = timed(lambda: batched_runs.update(runner.run_tasks(tasks, cfg, work / "batched")))
        one = timed(lambda: runner.run_tasks(tasks[:1], cfg, work / "one"))
        per_case_runs: dict = {}

        def per_case():
            for t in tasks:
                per_case_runs.update(runner.run_tasks([t], cfg, work / "single"))

        per_case_s = timed(per_case)
        ok = all_complete(batched_runs, nproc) and all_complete(per_case_runs, nproc)
        marginal = (batched - one) / max(len(tasks) - 1, 1)
        print(
            f"{nproc:>5} {batched:>10.1f} {one:>10.1f} {per_case_s:>11.1f} {per_case_s / batched:>8.1f}x {marginal:>16.2f}"
            + ("" if ok else "   (some case did not complete: figures invalid)"),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
