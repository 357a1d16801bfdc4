"""Faults a case can inject into one rank, to prove the harness reports them.

A fault is `how@phase:rank`, e.g. `raise@fsdp2_prepare:1`. It fires when
that rank enters that phase. `hang` sleeps outside any collective, so its
peers block in the next broadcast; `exit` and `abort` die without a result.
"""

from __future__ import annotations

import os
import signal
import time


def parse(fault: str) -> tuple[str, str, int]:
    how, _, rest = fault.partition("@")
    phase, _, rank = rest.partition(":")
    if how not in ("raise", "hang", "exit", "abort") or not phase or not rank.isdigit():
        raise ValueError(f"bad fault {fault!r}: expected how@phase:rank, how one of raise/hang/exit/abort")
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
        time.sleep(3600)
    if how == "exit":
        os._exit(7)
    if how == "abort":
        os.kill(os.getpid(), signal.SIGABRT)
