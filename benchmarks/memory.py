"""Memory committed in one phase per rank, fixed vs regressed loader, as a fraction of the model.

    python benchmarks/memory.py [--nproc 2 4] [--case big-llama] [--fixed stock fixed] [--regressed zeros-like-era]
    python benchmarks/memory.py --nproc 2 --case big-llama-bf16@bf16 --phase fsdp2_prepare --fixed fixed --regressed stock

Prints, for each world size, each rank's committed anonymous memory (peak
over the phase minus its start, RssAnon) divided by the checkpoint's bytes,
and the ratio regressed / fixed on the receiving ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsdp_load_checks import catalogue  # noqa: E402
from fsdp_load_checks.parent import runner, stop  # noqa: E402
from fsdp_load_checks.records import LaunchConfig  # noqa: E402
from fsdp_load_checks.render import lost_line  # noqa: E402

MiB = 1 << 20


def fractions(root: Path, case, loader: str, nproc: int, phase_name: str) -> dict[int, float]:
    cfg = LaunchConfig(nproc=nproc, loader=loader, case_timeout_s=600, startup_timeout_s=600)
    result = runner.run_batch(root, [case], cfg)[case.name]
    out = {}
    for rank, obs in sorted(result.run.observations.items()):
        phase = obs.memory.phases.get(phase_name)
        out[rank] = phase.committed / obs.memory.model_bytes if phase else float("nan")
    if result.run.lost or len(out) < nproc:
        print(f"  {loader}: not every rank reported: {[lost_line(lost) for lost in result.run.lost]}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--case", default="big-llama")
    parser.add_argument("--fixed", nargs="+", default=["stock", "fixed"])
    parser.add_argument("--regressed", default="zeros-like-era")
    parser.add_argument("--phase", default="from_pretrained", help="from_pretrained or fsdp2_prepare")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    case = catalogue.all_cases()[args.case]
    root = Path(tempfile.mkdtemp(prefix="fsdp-memory-"))
    for nproc in args.nproc:
        print(f"{args.case}, --nproc {nproc}: {args.phase} committed / model bytes, per rank")
        table = {loader: fractions(root, case, loader, nproc, args.phase) for loader in [*args.fixed, args.regressed]}
        print(f"  {'loader':<24}" + "".join(f"{'rank ' + str(r):>10}" for r in range(nproc)))
        for loader, per_rank in table.items():
            print(f"  {loader:<24}" + "".join(f"{per_rank.get(r, float('nan')):>9.3f}x" for r in range(nproc)))
        receiving = range(1, nproc)
        for fixed in args.fixed:
            worst_fixed = max(table[fixed].get(r, float("nan")) for r in receiving)
            least_regressed = min(table[args.regressed].get(r, float("nan")) for r in receiving)
            ratio = least_regressed / worst_fixed if worst_fixed > 0 else float("inf")
            print(f"  receiving ranks: {args.regressed} commits >= {least_regressed:.3f}x, {fixed} <= {worst_fixed:.3f}x: "
                  f"ratio {ratio:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(stop.run_stoppable(main, Path(__file__).name))  # a signal ends every launch it started
