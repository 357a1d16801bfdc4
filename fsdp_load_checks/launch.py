"""The parent side of a launch: torchrun in its own session, a wall clock, nothing left behind.

One launch runs a batch of cases. Ranks report where they are in a
progress file; the parent owns every timeout. A case whose ranks did not
all write a result is attributed the crash or hang (with the rank, phase,
exit code and log tail), and the cases after it are relaunched, so one bad
case never costs the verdicts of its neighbours.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fsdp_load_checks import observe
from fsdp_load_checks.rank import LaunchSpec, RankTask, log_path, progress_path, result_path

POLL_S = 0.2
STACK_DUMP_WAIT_S = 1.0
PEER_GRACE_S = 2.0


@dataclass
class LostRank:
    """A rank that wrote no result for a case: it hung, died, or was torn down with its peers."""

    rank: int
    case: str
    phase: str
    how: str  # "hung" | "died" | "stopped"
    exit_code: int | None
    log_tail: str

    def one_line(self) -> str:
        code = "" if self.exit_code is None else f", exit code {self.exit_code}"
        signame = ""
        if self.exit_code is not None and self.exit_code < 0:
            try:
                signame = f" ({signal.Signals(-self.exit_code).name})"
            except ValueError:
                pass
        return f"rank {self.rank} {self.how} during {self.phase} of {self.case}{code}{signame}"


@dataclass
class CaseRun:
    """Everything the ranks left for one case."""

    case: str
    world_size: int
    observations: dict[int, observe.Observation] = field(default_factory=dict)
    lost: list[LostRank] = field(default_factory=list)
    launch_dir: str = ""


@dataclass
class LaunchConfig:
    nproc: int = 2
    loader: str = "stock"
    backend: str = "gloo"
    case_timeout_s: float = 120.0
    startup_timeout_s: float = 300.0
    control_timeout_s: float = 5.0
    poison: bool = False  # --poison-uninitialized: NaN-fill uninitialised memory on every rank
    nnodes: int = 1  # >1: that many torchrun agents on this machine, one per simulated node

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_commands(spec_path: Path, cfg: LaunchConfig) -> list[list[str]]:
    """One torchrun agent per node.

    One node: --standalone, a c10d rendezvous on localhost:0, so concurrent
    launches never share a port. Several: agents meet at a fresh port (the
    first agent hosts the store) under a unique run id, as on a real
    multi-node job, where each node's LOCAL_RANK 0 is a loading rank.
    """
    base = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.nproc}", "--max-restarts=0",
            "--monitor-interval=0.1"]
    tail = ["-m", "fsdp_load_checks.rank", str(spec_path)]
    if cfg.nnodes == 1:
        return [[*base, "--standalone", *tail]]
    endpoint = f"127.0.0.1:{free_port()}"
    run_id = f"fsdp-load-checks-{os.getpid()}-{spec_path.parent.name}"
    return [
        [*base, f"--nnodes={cfg.nnodes}", f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
         f"--rdzv-id={run_id}", *(["--rdzv-conf=is_host=1"] if node == 0 else ["--rdzv-conf=is_host=0"]), *tail]
        for node in range(cfg.nnodes)
    ]


def rank_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_FSDP", None)  # ranks set the flags themselves, after init
    env.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
    return env


def read_progress(out_dir: Path, rank: int) -> dict | None:
    try:
        return json.loads(progress_path(out_dir, rank).read_text())
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launch's session and every descendant we can still see, then reap."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in descendants:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    psutil.wait_procs(descendants, timeout=10)


def dump_stacks(out_dir: Path, nproc: int) -> None:
    """Ask each rank for its Python stacks (faulthandler on SIGUSR1 writes them to its log)."""
    sent = False
    for rank in range(nproc):
        state = read_progress(out_dir, rank)
        if state and state.get("phase") != "exit":
            try:
                os.kill(int(state["pid"]), signal.SIGUSR1)
                sent = True
            except (ProcessLookupError, PermissionError):
                pass
    if sent:
        time.sleep(STACK_DUMP_WAIT_S)


EXIT_CODE_RE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def exit_codes(launch_log: Path) -> dict[int, int]:
    """Per-rank exit codes from torchrun's failure summary (it prints them only on failure)."""
    try:
        text = launch_log.read_text(errors="replace")
    except OSError:
        return {}
    return {int(r): int(c) for r, c in EXIT_CODE_RE.findall(text)}


@dataclass
class Watch:
    """What the parent saw while waiting: a hang (rank, case, phase) or a clean end."""

    hung: set[int] = field(default_factory=set)  # overdue ranks furthest behind: the ones that hang
    waiting: set[int] = field(default_factory=set)  # overdue ranks blocked on the hung ones
    startup_timeout: bool = False
    port_in_use: str = ""  # the rendezvous endpoint a torchrun agent could not listen on


PHASE_ORDER = ("startup", "import", "from_pretrained", "fsdp2_prepare", "observe", "forward", "done", "exit")


def position(state: dict | None) -> tuple[int, int]:
    state = state or {}
    phase = state.get("phase", "startup")
    return (PHASE_ORDER.index(phase) if phase in PHASE_ORDER else 0, int(state.get("step", 0)))


def split_overdue(overdue: list[int], states: dict[int, dict | None]) -> Watch:
    """Of the ranks stuck in one case, those furthest behind hang; the rest wait for them in a collective."""
    behind = min(position(states[r]) for r in overdue)
    hung = {r for r in overdue if position(states[r]) == behind}
    return Watch(hung=hung, waiting=set(overdue) - hung)


def wait(procs: list[subprocess.Popen], out_dir: Path, cfg: LaunchConfig, on_progress: Callable | None) -> Watch:
    """Poll until torchrun exits or a rank overstays its case (or start-up) budget."""
    seen: dict[int, tuple[str, float]] = {}
    started = time.monotonic()
    done_cases: set[str] = set()
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
                if s and s["phase"] == "done" and (s["case"], r) not in done_cases:
                    done_cases.add((s["case"], r))
                    on_progress(s["case"], r)
        hung = []
        for r, s in states.items():
            if s is None or s["phase"] == "startup":
                continue
            if s["phase"] == "exit":
                continue
            case = s["case"]
            if seen.get(r, ("", 0.0))[0] != case:
                seen[r] = (case, now)
            if now - seen[r][1] > cfg.case_timeout_s:
                hung.append(r)
        if hung:
            # judge every live rank, not only the first overdue: the one that hangs may have entered later
            live = [r for r, s in states.items() if (s or {}).get("phase") != "exit"]
            return split_overdue(live, states)
        if len(seen) < cfg.world_size and now - started > cfg.startup_timeout_s:
            return Watch(startup_timeout=True)
    return Watch()


PORT_RETRIES = 3


def launch_once(tasks: list[RankTask], out_dir: Path, cfg: LaunchConfig, on_progress=None) -> Watch:
    """One launch; a rendezvous port taken between our pick and torchrun's bind is re-picked."""
    for _ in range(PORT_RETRIES):
        watch = _launch_once(tasks, out_dir, cfg, on_progress)
        if not watch.port_in_use or any(read_progress(out_dir, r) for r in range(cfg.world_size)):
            return watch
        for node in range(cfg.nnodes):
            launch_log(out_dir, node).rename(launch_log(out_dir, node).with_suffix(f".port-in-use.{_}.log"))
    return watch


PORT_IN_USE_RE = re.compile(r"port: (\d+).*EADDRINUSE")


def _launch_once(tasks: list[RankTask], out_dir: Path, cfg: LaunchConfig, on_progress=None) -> Watch:
    spec = LaunchSpec(
        tasks=tasks,
        out_dir=str(out_dir),
        loader=cfg.loader,
        backend=cfg.backend,
        case_timeout_s=cfg.case_timeout_s,
        control_timeout_s=min(cfg.control_timeout_s, cfg.case_timeout_s),
        poison=cfg.poison,
    )
    spec_path = out_dir / "spec.json"
    spec.save(spec_path)
    procs: list[subprocess.Popen] = []
    try:
        for node, cmd in enumerate(torchrun_commands(spec_path, cfg)):
            with open(launch_log(out_dir, node), "wb") as log:
                procs.append(subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=rank_env(),
                    start_new_session=True,
                ))
        watch = wait(procs, out_dir, cfg, on_progress)
        if watch.hung or watch.waiting or watch.startup_timeout:
            dump_stacks(out_dir, cfg.world_size)
    finally:
        for proc in procs:
            kill_tree(proc)
    for node in range(cfg.nnodes):
        found = PORT_IN_USE_RE.search(tail(launch_log(out_dir, node), 200))
        if found:
            watch.port_in_use = f"127.0.0.1:{found.group(1)}"
    return watch


def launch_log(out_dir: Path, node: int) -> Path:
    return out_dir / ("launch.log" if node == 0 else f"launch.node{node}.log")


def lost_ranks(case: str, missing: list[int], out_dir: Path, cfg: LaunchConfig, watch: Watch) -> list[LostRank]:
    codes = {}
    for node in range(cfg.nnodes):
        codes.update(exit_codes(launch_log(out_dir, node)))
    lost = []
    for r in missing:
        state = read_progress(out_dir, r) or {"case": case, "phase": "startup"}
        phase = state["phase"] if state.get("case") in (case, "") else f"{state['phase']} (of {state.get('case')})"
        if r in watch.hung:
            how = f"hung for more than {cfg.case_timeout_s:g}s (killed; Python stacks in its log)"
        elif r in watch.waiting:
            behind = ", ".join(map(str, sorted(watch.hung)))
            how = f"was blocked waiting for rank {behind} (killed)"
        elif watch.port_in_use and read_progress(out_dir, r) is None:
            how = (f"never started: rendezvous port {watch.port_in_use} was in use {PORT_RETRIES} times in a row "
                   "(another program is binding ports as fast as we pick them; free some ports or retry)")
        elif watch.startup_timeout:
            how = f"did not start within {cfg.startup_timeout_s:g}s"
        elif codes.get(r, 0) not in (0, -signal.SIGTERM, -signal.SIGKILL):
            how = "died"
        else:
            how = "was stopped after a peer failed"
        lost.append(LostRank(r, case, phase, how, codes.get(r), tail(log_path(out_dir, r))))
    # the rank that actually failed first in the report
    lost.sort(key=lambda x: (x.how.startswith(("was stopped", "was blocked")), x.rank))
    return lost


def run(
    tasks: list[RankTask],
    cfg: LaunchConfig,
    work_dir: Path,
    on_progress: Callable | None = None,
) -> dict[str, CaseRun]:
    """Run every task, relaunching after a crash or hang, and return one CaseRun per case."""
    runs: dict[str, CaseRun] = {}
    remaining = list(tasks)
    work_dir.mkdir(parents=True, exist_ok=True)
    while remaining:
        out_dir = Path(tempfile.mkdtemp(prefix="launch-", dir=work_dir))
        watch = launch_once(remaining, out_dir, cfg, on_progress)
        reached_any = any((read_progress(out_dir, r) or {}).get("case") for r in range(cfg.world_size))
        for i, task in enumerate(remaining):
            run_ = CaseRun(task.case, cfg.world_size, launch_dir=str(out_dir))
            for r in range(cfg.world_size):
                path = result_path(out_dir, task.case, r)
                if path.exists():
                    run_.observations[r] = observe.read(str(path))
            runs[task.case] = run_
            missing = [r for r in range(cfg.world_size) if r not in run_.observations]
            if missing:
                run_.lost = lost_ranks(task.case, missing, out_dir, cfg, watch)
                if not reached_any:
                    # nothing ever started: the same failure would repeat for every case
                    for later in remaining[i + 1 :]:
                        runs[later.case] = CaseRun(later.case, cfg.world_size, lost=run_.lost, launch_dir=str(out_dir))
                    remaining = []
                else:
                    remaining = remaining[i + 1 :]
                break
        else:
            remaining = []
    return runs
