"""Entry point of the reference process: `python -m fsdp_load_checks.reference ROOT CASE... [--serve]`.

Checkpoints first (the launch needs them), then each case's plain-load
observation, each behind a file lock and written once per run root.

With `--serve` the process stays for its batch (one interpreter, not two, per
batch: an interpreter importing torch, transformers and accelerate costs ~9 s
of CPU): it says `CHECKPOINTS` on stdout once every checkpoint is on disk (the
parent starts the launch then: the plain loads are made while the ranks start
and run), `BUILT` once every plain load is observed, then reads job files from
stdin, one path per line, reloads what rank 0's `save_pretrained` wrote
(reference/reload.py) and says `RELOADED` after each; it exits at end of
input. Everything else the process prints goes to stderr, so stdout carries
only those lines.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch
from filelock import FileLock

from fsdp_load_checks import accelerate_config, checkpoints, observe
from fsdp_load_checks.catalogue import all_cases
from fsdp_load_checks.records import Case
from fsdp_load_checks.records.protocol import REFERENCE_BUILT, REFERENCE_CHECKPOINTS, REFERENCE_RELOADED, reference_path
from fsdp_load_checks.reference.plain import observe_plain
from fsdp_load_checks.reference.reload import run_jobs


def build_checkpoints(root: Path, cases: list[Case]) -> dict[str, float]:
    """Each case's checkpoint (checkpoints.build: once per run root); case -> seconds it took here."""
    built = {}
    for case in cases:
        started = time.monotonic()
        checkpoints.build(root, case)
        built[case.name] = round(time.monotonic() - started, 4)  # ~0 where another process built it
    return built


def observe_references(root: Path, cases: list[Case], run_config: str, built: dict[str, float]) -> None:
    """Each case's plain load under its accelerate config (the run's unless its own), from its built checkpoint."""
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
    parser.add_argument("--serve", action="store_true", help="after building, reload the job files named on stdin")
    args = parser.parse_args(argv)
    # the protocol's own stdout; fd 1 becomes stderr, so nothing else the libraries print can reach the parent
    said = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    torch.set_num_threads(1)
    catalogue = all_cases()
    gc.freeze()  # the imports live for the process: the collector's automatic passes skip them (rank/case.py)
    cases = [catalogue[n] for n in args.cases]
    built = build_checkpoints(args.root, cases)
    if args.serve:
        print(REFERENCE_CHECKPOINTS, file=said)
    observe_references(args.root, cases, args.accelerate_config, built)
    if args.serve:
        print(REFERENCE_BUILT, file=said)
        for line in sys.stdin:
            run_jobs(Path(line.strip()), catalogue)
            gc.collect()
            print(REFERENCE_RELOADED, file=said)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
