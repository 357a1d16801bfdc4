"""Entry point of the reference process: `python -m fsdp_load_checks.reference ROOT CASE...`.

Checkpoints first (the launch needs them), then each case's plain-load
observation, each behind a file lock and written once per run root.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from filelock import FileLock

from fsdp_load_checks import checkpoints, observe
from fsdp_load_checks.catalogue import all_cases
from fsdp_load_checks.records import Case
from fsdp_load_checks.records.protocol import reference_path
from fsdp_load_checks.reference.plain import observe_plain


def materialize(root: Path, cases: list[Case]) -> None:
    for case in cases:
        checkpoints.build(root, case)
    for case in cases:
        out = reference_path(root, case.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out) + ".lock"):
            if not out.exists():
                observe.write(observe_plain(case, checkpoints.checkpoint_dir(root, case)), str(out))


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    root, names = Path(argv[0]), argv[1:]
    catalogue = all_cases()
    materialize(root, [catalogue[n] for n in names])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
