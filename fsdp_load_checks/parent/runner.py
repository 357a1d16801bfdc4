"""One run of the suite: checkpoints and references, the launches, the verdicts.

Shared by the pytest plugin and the CLI. Results are stored under the run
directory behind a file lock per batch, so several pytest-xdist workers
asking for the same cases launch them once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock

from fsdp_load_checks import accelerate_config, checkpoints, observe, render
from fsdp_load_checks.checks import verdicts
from fsdp_load_checks.parent.diagnosis import lost_ranks
from fsdp_load_checks.parent.launch import PORT_RETRIES, child_env, launch_once
from fsdp_load_checks.parent.reload import reload_saved
from fsdp_load_checks.parent.watchdog import read_progress
from fsdp_load_checks.records import Case, CaseResult, CaseRun, LaunchConfig, RankTask
from fsdp_load_checks.records.protocol import reference_path, result_path


class SetupError(RuntimeError):
    """The environment, not a case, is broken (the reference process could not even run)."""


GPU_LOCK = Path(tempfile.gettempdir()) / "fsdp-load-checks-gpus.lock"


def run_tasks(tasks: list[RankTask], cfg: LaunchConfig, work_dir: Path, on_progress: Callable | None = None) -> dict[str, CaseRun]:
    """Run every task, relaunching after a crash or hang for the cases left; one CaseRun per case."""
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
                run_.lost = lost_ranks(task.case, missing, out_dir, cfg, watch, PORT_RETRIES)
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


def materialize(root: Path, cases: list[Case], timeout_s: float, run_config: str = accelerate_config.DEFAULT) -> None:
    """Build checkpoints and reference observations in a fresh interpreter (the reference process)."""
    cmd = [sys.executable, "-m", "fsdp_load_checks.reference", str(root), *(c.name for c in cases),
           "--accelerate-config", run_config]
    try:
        proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout_s, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise SetupError(f"building checkpoints/references took more than {timeout_s:g}s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SetupError(f"building checkpoints/references failed: {last}\n{proc.stderr[-4000:]}")


def task_for(root: Path, case: Case) -> RankTask:
    return RankTask(case.name, str(checkpoints.checkpoint_dir(root, case)), case.dtype, list(case.imports), case.seed, case.fault)


def config_for(case: Case, cfg: LaunchConfig) -> LaunchConfig:
    """The launch configuration a case runs under: the run's, or its own accelerate config (`Case.under`)."""
    name = case.accelerate_config or cfg.accelerate_config
    if name == cfg.accelerate_config:
        return cfg
    return dataclasses.replace(cfg, accelerate_config=name, accelerate_env=accelerate_config.load(name).env)


def run_batch(root: Path, cases: list[Case], cfg: LaunchConfig, on_progress: Callable | None = None) -> dict[str, CaseResult]:
    """Checkpoints and references, one launch per accelerate config (more after a crash or hang), every verdict."""
    materialize(root, cases, cfg.startup_timeout_s + cfg.case_timeout_s * len(cases), cfg.accelerate_config)
    groups: dict[str, tuple[LaunchConfig, list[RankTask]]] = {}
    for case in cases:
        launch_cfg = config_for(case, cfg)
        groups.setdefault(launch_cfg.accelerate_config, (launch_cfg, []))[1].append(task_for(root, case))
    # every nccl rank owns a GPU: concurrent launches (pytest-xdist workers) take the GPUs in turn
    gpus = FileLock(str(GPU_LOCK)) if cfg.backend == "nccl" else contextlib.nullcontext()
    runs: dict[str, CaseRun] = {}
    with gpus:
        for launch_cfg, tasks in groups.values():
            runs.update(run_tasks(tasks, launch_cfg, root / "launches" / cfg.loader, on_progress))
    reload_saved(runs, cfg.startup_timeout_s + cfg.case_timeout_s * len(cases))  # the state-dict check's plain reload
    results = {}
    for case in cases:
        ref_file = reference_path(root, case.name)
        ref = observe.read(str(ref_file)) if ref_file.exists() else None
        run = runs[case.name]
        found = verdicts(run, ref)
        for verdict in found.values():
            verdict.details = render.details(verdict, run, ref)
        results[case.name] = CaseResult(case.name, run, ref, found)
    return results


def run_batch_once(root: Path, key: str, cases: list[Case], cfg: LaunchConfig) -> dict[str, CaseResult]:
    """`run_batch`, computed by whichever process gets here first and read back by the others."""
    store = root / "batches" / f"{key}.pt"
    store.parent.mkdir(parents=True, exist_ok=True)
    error = store.with_suffix(".error")
    with FileLock(str(store) + ".lock"):
        if store.exists():
            return torch.load(store, weights_only=False)
        if error.exists():  # every item of a broken batch gets the one error, not one rebuild each
            raise SetupError(error.read_text())
        try:
            results = run_batch(root, cases, cfg)
        except SetupError as exc:
            error.write_text(str(exc))
            raise
        tmp = store.with_suffix(".tmp")
        torch.save(results, tmp)
        tmp.replace(store)
        return results
