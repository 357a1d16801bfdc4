"""Faults a case can inject into one rank, to prove the harness reports them.

A fault is `how@phase:rank`, e.g. `raise@fsdp2_prepare:1`. It fires when
that rank enters that phase (`startup`: a launch's first case's fault, before
torch is imported). `hang` sleeps outside any collective, so its
peers block in the next broadcast; `exit` and `abort` die without a result.
`hang-in-accelerate` (at fsdp2_prepare) makes accelerate's own
`fsdp2_load_full_state_dict` sleep on that rank before its first broadcast,
so the hang is inside accelerate's code, where this suite announces no
progress and only the ranks' stacks tell who is behind.
"""

from __future__ import annotations

import os
import signal
import time

HOWS = ("raise", "hang", "hang-in-accelerate", "exit", "abort")
HANG_S = 3600  # longer than any case timeout: the watchdog ends it


def parse(fault: str) -> tuple[str, str, int]:
    how, _, rest = fault.partition("@")
    phase, _, rank = rest.partition(":")
    if how not in HOWS or not phase or not rank.isdigit():
        raise ValueError(f"bad fault {fault!r}: expected how@phase:rank, how one of {'/'.join(HOWS)}")
    return how, phase, int(rank)


def fire(fault: str | None, phase: str, rank: int) -> None:
    """Inject `fault` if this rank has just entered its phase."""
    if not fault:
        return
    how, at, who = parse(fault)
    if at != phase or who != rank:
        return
    if how == "raise":
        raise RuntimeError(f"injected fault on rank {rank} during {phase}")
    if how == "hang":
        time.sleep(HANG_S)
    if how == "hang-in-accelerate":
        _stall_accelerate_broadcasts()
    if how == "exit":
        os._exit(7)
    if how == "abort":
        os.kill(os.getpid(), signal.SIGABRT)


def _stall_accelerate_broadcasts() -> None:
    """Make this rank sleep inside accelerate's `fsdp2_prepare_model`, just before the state-dict broadcasts.

    `fsdp2_prepare_model` looks the function up in its module at call time, so patching the module
    attribute puts the sleep under accelerate's own frame; rank 0 meanwhile blocks in the broadcast.
    """
    from accelerate.utils import fsdp_utils

    original = fsdp_utils.fsdp2_load_full_state_dict

    def stalled(*args, **kwargs):
        time.sleep(HANG_S)
        return original(*args, **kwargs)

    fsdp_utils.fsdp2_load_full_state_dict = stalled
