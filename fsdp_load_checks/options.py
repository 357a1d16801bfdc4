"""Validation of user-facing options, shared by the pytest plugin and the CLI.

Errors are one line: what is wrong and what to pass instead.
"""

from __future__ import annotations

import os


def positive_int(raw, flag: str, hint: str = "") -> int:
    try:
        value = int(str(raw), 10)
    except ValueError:
        raise ValueError(f"{flag} must be a positive integer, got {raw!r}{hint}") from None
    if value < 1:
        raise ValueError(f"{flag} must be at least 1, got {value}{hint}")
    return value


def parse_nproc(raw) -> int:
    value = positive_int(raw, "--nproc", ": pass the ranks per node, e.g. --nproc 2")
    cores = os.cpu_count() or 1
    if value > 64 * cores:
        raise ValueError(f"--nproc {value} is far more ranks than this machine's {cores} cores can run; use at most {8 * cores}")
    return value


def parse_nnodes(raw) -> int:
    return positive_int(raw, "--nnodes")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def backend_for(choice: str, nproc: int, nnodes: int = 1) -> str:
    """nccl only when every rank can own a GPU; gloo (CPU) otherwise. Simulated nodes share this machine's GPUs."""
    gpus = gpu_count()
    nproc = nproc * nnodes
    if choice == "nccl" and gpus < nproc:
        raise ValueError(
            f"--fsdp-backend nccl needs one GPU per rank: --nproc {nproc} but {gpus} GPU(s) visible; "
            f"use --nproc {max(gpus, 1)} or --fsdp-backend gloo"
        )
    if choice == "auto":
        return "nccl" if gpus >= nproc else "gloo"
    return choice
