"""Entry point of the reference process: `python -m fsdp_load_checks.reference ROOT CASE...`.

Checkpoints first (the launch needs them), then each case's plain-load
observation, each behind a file lock and written once per run root.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from filelock import FileLock

from fsdp_load_checks import accelerate_config, checkpoints, observe
from fsdp_load_checks.catalogue import all_cases
from fsdp_load_checks.records import Case
from fsdp_load_checks.records.protocol import reference_path
from fsdp_load_checks.reference.plain import observe_plain


def materialize(root: Path, cases: list[Case], run_config: str) -> None:
    """Each case's checkpoint, then its plain load under its accelerate config (the run's unless its own)."""
    built = {}
    for case in cases:
        started = time.monotonic()
        checkpoints.build(root, case)
        built[case.name] = round(time.monotonic() - started, 4)  # ~0 where another process built it
    for case in cases:
        out = reference_path(root, case.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        mixed_precision = accelerate_config.load(case.accelerate_config or run_config).mixed_precision
        with FileLock(str(out) + ".lock"):
            if not out.exists():
                started = time.monotonic()
                obs = observe_plain(case, checkpoints.checkpoint_dir(root, case), mixed_precision)
                obs.seconds = {"checkpoint": built[case.name], "reference": round(time.monotonic() - started, 4)}
                observe.write(obs, str(out))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsdp_load_checks.reference")
    parser.add_argument("root", type=Path)
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--accelerate-config", default=accelerate_config.DEFAULT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    catalogue = all_cases()
    gc.freeze()  # the imports live for the process: the collector's automatic passes skip them (rank/case.py)
    materialize(args.root, [catalogue[n] for n in args.cases], args.accelerate_config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
