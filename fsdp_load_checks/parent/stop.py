"""Every process a run starts, and an orderly stop on SIGTERM, SIGINT or SIGHUP.

Torchrun agents, their ranks and the reference builder each run in a session
of their own (so a watchdog kill takes the whole launch), which also means a
signal to the front end never reaches them. So the front ends (the CLI, every
pytest process) install `install()`'s handler: it freezes, then SIGKILLs, the
process group of every process started through `spawn` and every descendant
psutil can see, and raises `Stopped` in the main thread, which unwinds the run
so the verdicts already complete can still be reported. Processes are found
by the pids recorded here and by parent links, never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psutil

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GONE_WAIT_S = 5.0  # SIGKILL is immediate; this only bounds waiting for the kernel to tear processes down


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal; `results` holds the case results complete by then (runner fills it).

    A KeyboardInterrupt, so pytest treats it as an interruption and no `except Exception` swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = signum
        self.results: dict = {}


_started: dict[int, subprocess.Popen] = {}  # pid -> a process we started, each the leader of its own session
_stopped_by: list[int] = []  # the signal that stopped this process (at most one entry)
_previous: dict[int, object] = {}


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + signum


def stopped_by() -> int | None:
    """The signal that stopped this process, or None."""
    return _stopped_by[0] if _stopped_by else None


def spawn(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """Start `cmd` in a session of its own and record it; Stopped once this process is stopping.

    Ended by `end(proc)` (or by the signal handler); never left running.
    """
    if _stopped_by:
        raise Stopped(_stopped_by[0])
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    _started[proc.pid] = proc
    if _stopped_by:  # a signal arrived while it started (in another thread): it must not outlive the stop
        end(proc)
        raise Stopped(_stopped_by[0])
    return proc


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _freeze_and_kill(procs: list[subprocess.Popen], also_under: psutil.Process | None = None) -> list[psutil.Process]:
    """SIGSTOP, then SIGKILL, every process of `procs` with its process group and descendants (and `also_under`'s).

    Frozen first, so no process can start another between the snapshot and the kill: ranks live in
    sessions of their own, and a rank started after the snapshot would outlive its agent. A leader
    already reaped (returncode set) is not looked up by pid, which may name another process by now;
    its group is still killed, since a group id is not reused while any member lives. Returns the
    processes killed.
    """
    seen: dict[int, psutil.Process] = {}
    for _ in range(5):  # until a snapshot finds nothing new; frozen parents cannot fork
        roots = []
        for proc in procs:
            if proc.returncode is None:
                try:
                    roots.append(psutil.Process(proc.pid))
                except psutil.NoSuchProcess:
                    pass
        found = [*roots, *(d for r in roots for d in _descendants(r))]
        if also_under is not None:
            found += _descendants(also_under)
        new = [p for p in found if p.pid not in seen and p.pid != os.getpid()]
        if not new:
            break
        for p in new:
            seen[p.pid] = p
            try:
                p.suspend()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in seen.values():
        try:
            p.kill()  # psutil checks the pid still names the process it found (no reuse)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return list(seen.values())


def wait_gone(procs: list[psutil.Process], timeout_s: float = GONE_WAIT_S) -> list[psutil.Process]:
    """Wait until each process has exited (a zombie has: only its parent's reaping is left); the ones left."""
    deadline = time.monotonic() + timeout_s
    left = list(procs)
    while left:
        left = [p for p in left if alive(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return left


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def end(proc: subprocess.Popen) -> None:
    """Kill a process we spawned, its process group and every descendant; reap it and forget it."""
    killed = _freeze_and_kill([proc])
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    wait_gone(killed)
    _started.pop(proc.pid, None)


def end_everything() -> list[psutil.Process]:
    """Kill every process this process started (recorded, or a descendant) and wait until they are gone.

    Safe in a signal handler: it never waits on a Popen (whose lock the interrupted code may hold);
    the processes are left as zombies for their parents to reap. Returns those still alive (none, normally).
    """
    killed = _freeze_and_kill(list(_started.values()), also_under=psutil.Process())
    return wait_gone(killed)


def _handle(signum: int, frame) -> None:
    first = not _stopped_by
    if first:
        _stopped_by.append(signum)
    end_everything()
    if first:
        raise Stopped(signum)
    # a later signal (Ctrl-C twice, a group-wide SIGTERM after the first): the stop is already unwinding,
    # and raising again could cut short the reports it writes; a process started meanwhile is ended above


def install() -> bool:
    """Handle SIGTERM, SIGINT and SIGHUP with an orderly stop; False where they cannot be set (not the main thread)."""
    try:
        for signum in SIGNALS:
            _previous[signum] = signal.signal(signum, _handle)
    except ValueError:  # not the main thread
        return False
    return True


def uninstall() -> None:
    """Put back the handlers `install` replaced."""
    for signum, handler in list(_previous.items()):
        try:
            signal.signal(signum, handler)
        except (ValueError, TypeError):
            pass
    _previous.clear()


def run_stoppable(main: Callable[[], int], name: str) -> int:
    """`main()` under `install()`'s handler, for a script's entry point (the benchmarks): on SIGTERM, SIGINT or
    SIGHUP every process it started is ended, one line on stderr says so, and the exit code is 128 + N."""
    install()
    try:
        return main()
    except Stopped as stopped:
        print(f"{name}: stopped by {signal_name(stopped.signum)}; every process it started was ended", file=sys.stderr)
        return exit_code(stopped.signum)
    finally:
        uninstall()
