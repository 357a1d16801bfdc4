"""Many launches at once never share a rendezvous port, a work directory or a process.

Each launch here is empty (rendezvous, process group, exit), so the test
exercises exactly what concurrent pytest-xdist workers share: ports, temp
directories and process groups. Half are two simulated nodes, whose agents
meet on a TCP port the launcher picks, the one place a collision could happen.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from fsdp_load_checks import render
from fsdp_load_checks.parent import launch
from fsdp_load_checks.parent.watchdog import read_progress
from fsdp_load_checks.records import LaunchConfig, LostHow

# every launch is 2-3 processes importing torch (~150 MB anonymous memory, ~10 s of CPU each launch). One wave,
# all started at once, is the densest contention for ports and directories; 8 is what the densest real run
# makes (the GPU template's `-n 8`, one launch per xdist worker). The 50 launches of old (12 at a time) cost
# 4x the time for less contention; 12 at once, 1.5x the CPU of 8 for a density no run reaches
IN_FLIGHT = 8
LAUNCHES = IN_FLIGHT


def empty_launch(i: int, work: Path) -> tuple[Path, list]:
    cfg = LaunchConfig(nproc=1 if i % 2 else 2, nnodes=2 if i % 2 else 1, startup_timeout_s=240)
    out_dir = Path(tempfile.mkdtemp(prefix="launch-", dir=work))
    launch.launch_once([], out_dir, cfg)
    states = [read_progress(out_dir, r) for r in range(cfg.world_size)]
    return out_dir, states


def test_concurrent_launches_all_rendezvous_and_leave_nothing(tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        results = list(pool.map(lambda i: empty_launch(i, tmp_path), range(LAUNCHES)))
    dirs = [d for d, _ in results]
    assert len(set(dirs)) == LAUNCHES
    not_exited = {str(d.name): s for d, states in results for s in states if not s or s["phase"] != "exit"}
    assert not_exited == {}
    leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert leftover == []


def test_a_rendezvous_port_taken_before_torchrun_binds_it_is_picked_again(tmp_path, monkeypatch):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])  # the first pick collides, later picks are fresh
    real_free_port = launch.free_port
    monkeypatch.setattr(launch, "free_port", lambda: next(ports, None) or real_free_port())
    cfg = LaunchConfig(nproc=1, nnodes=2, startup_timeout_s=120)
    out_dir = tmp_path / "launch"
    out_dir.mkdir()
    try:
        watch = launch.launch_once([], out_dir, cfg)
    finally:
        taken.close()
    assert [read_progress(out_dir, r)["phase"] for r in range(2)] == ["exit", "exit"]
    assert not watch.port_in_use
    assert list(out_dir.glob("launch.port-in-use.*.log"))  # the collision was seen, and retried


def test_a_port_that_stays_taken_is_reported_in_one_line(tmp_path, monkeypatch):
    import socket

    from fsdp_load_checks import catalogue
    from fsdp_load_checks.parent import runner

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    monkeypatch.setattr(launch, "free_port", lambda: port)
    cfg = LaunchConfig(nproc=1, nnodes=2, startup_timeout_s=120)
    start = time.monotonic()
    # the launches alone (runner.run_tasks): no rank starts, so no checkpoint or plain load is ever needed
    task = runner.task_for(tmp_path, catalogue.select(["llama-rope"])[0])
    try:
        run = runner.run_tasks([task], cfg, tmp_path / "launches")["llama-rope"]
    finally:
        taken.close()
    assert run.lost and not run.observations and {lost.how for lost in run.lost} == {LostHow.NEVER_STARTED}, run
    line = render.lost_line(run.lost[0])  # what every check of the case says first, after "llama-rope: "
    assert f"rendezvous port 127.0.0.1:{port} was in use 3 times in a row" in line, line
    # a dead agent ends the launch: its peer is not waited for until the start-up timeout
    assert time.monotonic() - start < cfg.startup_timeout_s
