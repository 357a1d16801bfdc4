"""parent/stop.py on its own: exit codes, and ending a process tree that spans sessions (real processes, no torch)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from fsdp_load_checks.parent import stop


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_each_signal_maps_to_the_shells_exit_code(sig, code):
    assert stop.exit_code(sig) == code
    assert str(stop.Stopped(sig)) == f"stopped by {sig.name}"
    assert sig in stop.SIGNALS


def test_a_tree_across_sessions_is_ended_by_pid():
    # like a torchrun agent: a leader whose child moved to a session of its own, out of the leader's group
    proc = stop.spawn(["bash", "-c", "setsid sleep 300 & sleep 300"], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        sessions = {os.getsid(p.pid) for p in tree if stop.alive(p)}
        if len(tree) == 3 and len(sessions) == 2:  # the leader's session and the escaped child's
            break
        time.sleep(0.01)
    else:
        pytest.fail(f"the tree never formed: {tree}")
    stop.end(proc)
    assert [p.pid for p in tree if stop.alive(p)] == []
    assert proc.returncode == -signal.SIGKILL
    assert proc.pid not in stop._started
