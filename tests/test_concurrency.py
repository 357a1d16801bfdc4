"""Many launches at once never share a rendezvous port, a work directory or a process.

Each launch here is empty (rendezvous, process group, exit), so the test
exercises exactly what concurrent pytest-xdist workers share: ports, temp
directories and process groups. Half are two simulated nodes, whose agents
meet on a TCP port the launcher picks, the one place a collision could happen.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from fsdp_load_checks import launch

LAUNCHES = 50
# every launch is 2-3 processes importing torch (~150 MB anonymous memory each): 12 live launches fit
# the CI machine's share beside the other xdist worker; all 50 still contend for ports and directories
IN_FLIGHT = 12


def empty_launch(i: int, work: Path) -> tuple[Path, list]:
    cfg = launch.LaunchConfig(nproc=1 if i % 2 else 2, nnodes=2 if i % 2 else 1, startup_timeout_s=240)
    out_dir = Path(tempfile.mkdtemp(prefix="launch-", dir=work))
    launch.launch_once([], out_dir, cfg)
    states = [launch.read_progress(out_dir, r) for r in range(cfg.world_size)]
    return out_dir, states


def test_fifty_concurrent_launches_all_rendezvous_and_leave_nothing(tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        results = list(pool.map(lambda i: empty_launch(i, tmp_path), range(LAUNCHES)))
    dirs = [d for d, _ in results]
    assert len(set(dirs)) == LAUNCHES
    not_exited = {str(d.name): s for d, states in results for s in states if not s or s["phase"] != "exit"}
    assert not_exited == {}
    leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert leftover == []
