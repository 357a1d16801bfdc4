"""The parent's wall clock over a launch: ranks report where they are, the parent decides when they hang.

Each rank rewrites its progress file (pid, case, phase, collectives
announced) at every step. A launch in which no rank has announced progress
(a new case, phase or collective) for the budget (`--fsdp-timeout`) hangs:
of its ranks, those furthest behind hang and the rest wait for them in a
collective. Progress, not a case's total time: a big case on a loaded
machine is slow in every phase, never still in one (a budget per case ended
big-llama's after-loading phases under CI load, at a different phase each
time, while both ranks kept moving).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fsdp_load_checks.records import Phase
from fsdp_load_checks.records.protocol import decode_progress, progress_path

POLL_S = 0.2
RETRIES = 20  # reads of a torn progress record before it counts as unreadable
STACK_DUMP_WAIT_S = 1.0
PEER_GRACE_S = 2.0


@dataclass
class Watch:
    """What the parent saw while waiting: a hang (rank, case, phase) or a clean end."""

    hung: set[int] = field(default_factory=set)  # overdue ranks furthest behind: the ones that hang
    waiting: set[int] = field(default_factory=set)  # overdue ranks blocked on the hung ones
    overdue: set[int] = field(default_factory=set)  # overdue ranks neither progress nor stacks can place (stacks.judge)
    why: str = ""  # why the overdue ones could not be placed
    collective: dict[int, str] = field(default_factory=dict)  # waiting rank -> the torch function it waits in
    startup_timeout: bool = False
    port_in_use: str = ""  # the rendezvous endpoint a torchrun agent could not listen on

    @property
    def case_timeout(self) -> bool:
        """The launch was ended because a case overstayed its budget."""
        return bool(self.hung or self.waiting or self.overdue)


def read_progress(out_dir: Path, rank: int) -> dict | None:
    """The rank's last progress state ({pid, case, phase, step, since}), or None before it wrote one.

    The rank rewrites its record in place (rank/progress.py): a read that races the write can mix old and
    new bytes, caught by the record's CRC32 and read again (1 ms apart: the writer may be descheduled).
    """
    for _ in range(RETRIES):
        try:
            return decode_progress(progress_path(out_dir, rank).read_bytes())
        except OSError:
            return None
        except ValueError:  # torn: read again
            time.sleep(0.001)
    return None


def position(state: dict | None) -> tuple[int, int]:
    """(phase, collectives announced): comparable across ranks in the same case."""
    state = state or {}
    return (Phase.order(state.get("phase", Phase.STARTUP)), int(state.get("step", 0)))


def split_overdue(overdue: list[int], states: dict[int, dict | None]) -> Watch:
    """Of the ranks stuck in one case, those furthest behind hang; the rest wait for them in a collective."""
    behind = min(position(states[r]) for r in overdue)
    hung = {r for r in overdue if position(states[r]) == behind}
    return Watch(hung=hung, waiting=set(overdue) - hung)


def dump_stacks(out_dir: Path, world_size: int) -> None:
    """Ask each live rank for its Python stacks (faulthandler on SIGUSR1 writes them to its log)."""
    sent = False
    for rank in range(world_size):
        state = read_progress(out_dir, rank)
        if state and state.get("phase") != Phase.EXIT:
            try:
                os.kill(int(state["pid"]), signal.SIGUSR1)
                sent = True
            except (ProcessLookupError, PermissionError):
                pass
    if sent:
        time.sleep(STACK_DUMP_WAIT_S)


def wait(procs: list[subprocess.Popen], out_dir: Path, cfg, on_progress: Callable | None) -> Watch:
    """Poll until torchrun exits, no rank progresses for the case budget, or start-up overstays its own.

    `cfg` is the launch's `records.LaunchConfig`; `on_progress(case, rank)`
    is called once per case each rank finishes.
    """
    seen: dict[int, tuple[tuple, float]] = {}  # rank -> ((case, phase, step), when the parent first saw it)
    started = time.monotonic()
    done_cases: set[tuple[str, int]] = set()
    first_dead = None
    while any(p.poll() is None for p in procs):
        time.sleep(POLL_S)
        now = time.monotonic()
        if first_dead is None and any(p.poll() not in (None, 0) for p in procs):
            first_dead = now
        if first_dead is not None and now - first_dead > cfg.control_timeout_s + PEER_GRACE_S:
            # one node's agent failed: the other agents can only wait for it (a rendezvous that never
            # completes, or collectives with missing peers); give their ranks time to write, then stop
            return Watch()
        states = {r: read_progress(out_dir, r) for r in range(cfg.world_size)}
        if on_progress:
            for r, s in states.items():
                if s and s["phase"] == Phase.DONE and (s["case"], r) not in done_cases:
                    done_cases.add((s["case"], r))
                    on_progress(s["case"], r)
        for r, s in states.items():
            if s is None or s["phase"] in (Phase.STARTUP, Phase.EXIT):
                continue
            where = (s["case"], s["phase"], s.get("step", 0))
            if seen.get(r, ((), 0.0))[0] != where:
                seen[r] = (where, now)
        if seen and now - max(when for _, when in seen.values()) > cfg.case_timeout_s:
            # judge every live rank, not only the first overdue: the one that hangs may have entered later
            live = [r for r, s in states.items() if (s or {}).get("phase") != Phase.EXIT]
            return split_overdue(live, states)
        if len(seen) < cfg.world_size and now - started > cfg.startup_timeout_s:
            return Watch(startup_timeout=True)
    return Watch()
