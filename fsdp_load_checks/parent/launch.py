"""One torchrun launch in its own session: commands, environment, a wall clock, nothing left behind.

A launch runs a batch of cases (`records.protocol.LaunchSpec`). The parent
owns every timeout (watchdog.py); whatever happens, every process the launch
started is killed before `launch_once` returns (parent/stop.py: and on a signal).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from fsdp_load_checks import accelerate_config
from fsdp_load_checks.parent import stacks, stop
from fsdp_load_checks.parent.diagnosis import tail
from fsdp_load_checks.parent.watchdog import Watch, dump_stacks, read_progress, wait
from fsdp_load_checks.records import LaunchConfig, LaunchSpec, RankTask
from fsdp_load_checks.records.protocol import launch_log, spec_path

PORT_RETRIES = 3
PORT_IN_USE_RE = re.compile(r"port: (\d+).*EADDRINUSE")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_commands(spec_file: Path, cfg: LaunchConfig) -> list[list[str]]:
    """One torchrun agent per node.

    One node: --standalone, a c10d rendezvous on localhost:0, so concurrent
    launches never share a port. Several: agents meet at a fresh port (the
    first agent hosts the store) under a unique run id, as on a real
    multi-node job, where each node's LOCAL_RANK 0 is a loading rank.
    """
    base = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.nproc}", "--max-restarts=0",
            "--monitor-interval=0.1"]
    tail_ = ["-m", "fsdp_load_checks.rank", str(spec_file)]
    if cfg.nnodes == 1:
        return [[*base, "--standalone", *tail_]]
    endpoint = f"127.0.0.1:{free_port()}"
    run_id = f"fsdp-load-checks-{os.getpid()}-{spec_file.parent.name}"
    return [
        [*base, f"--nnodes={cfg.nnodes}", f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
         f"--rdzv-id={run_id}", *(["--rdzv-conf=is_host=1"] if node == 0 else ["--rdzv-conf=is_host=0"]), *tail_]
        for node in range(cfg.nnodes)
    ]


def child_env() -> dict[str, str]:
    """The environment of every process the parent starts (ranks and the reference process)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # glibc's dynamic mmap threshold rises after the first large free, so whether a tensor's memory is
    # mmapped (returned on free) or kept in the heap depended on the case before it: memory figures then
    # varied by 100 MiB for one case. A fixed threshold removes that cause.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    env.pop("ACCELERATE_USE_FSDP", None)  # ranks set the flags themselves, after init
    env.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
    return env


def launch_once(tasks: list[RankTask], out_dir: Path, cfg: LaunchConfig, on_progress: Callable | None = None) -> Watch:
    """One launch; a rendezvous port taken between our pick and torchrun's bind is re-picked."""
    for attempt in range(PORT_RETRIES):
        watch = _launch_once(tasks, out_dir, cfg, on_progress)
        if not watch.port_in_use or any(read_progress(out_dir, r) for r in range(cfg.world_size)):
            return watch
        for node in range(cfg.nnodes):
            launch_log(out_dir, node).rename(launch_log(out_dir, node).with_suffix(f".port-in-use.{attempt}.log"))
    return watch


def _launch_once(tasks: list[RankTask], out_dir: Path, cfg: LaunchConfig, on_progress: Callable | None) -> Watch:
    spec = LaunchSpec(
        tasks=tasks,
        out_dir=str(out_dir),
        loader=cfg.loader,
        backend=cfg.backend,
        case_timeout_s=cfg.case_timeout_s,
        control_timeout_s=min(cfg.control_timeout_s, cfg.case_timeout_s),
        poison=cfg.poison,
        accelerate_config=cfg.accelerate_config,
        accelerate_env=cfg.accelerate_env or accelerate_config.load(cfg.accelerate_config).env,
    )
    spec_file = spec_path(out_dir)
    spec.save(spec_file)
    procs: list[subprocess.Popen] = []
    try:
        for node, cmd in enumerate(torchrun_commands(spec_file, cfg)):
            with open(launch_log(out_dir, node), "wb") as log:
                procs.append(stop.spawn(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=child_env()))
        watch = wait(procs, out_dir, cfg, on_progress)
        if watch.case_timeout or watch.startup_timeout:
            dump_stacks(out_dir, cfg.world_size)
        if watch.case_timeout:
            watch = stacks.judge(watch, {r: stacks.read_stack(out_dir, r) for r in watch.hung | watch.waiting})
    finally:
        for proc in procs:
            stop.end(proc)
    for node in range(cfg.nnodes):
        found = PORT_IN_USE_RE.search(tail(launch_log(out_dir, node), 200))
        if found:
            watch.port_in_use = f"127.0.0.1:{found.group(1)}"
    return watch
