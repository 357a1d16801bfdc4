"""One run of the suite: checkpoints and references, the launches, the verdicts.

Shared by the pytest plugin and the CLI. Results are stored under the run
directory behind a file lock per batch, so several pytest-xdist workers
asking for the same cases launch them once.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock

from fsdp_load_checks import accelerate_config, checkpoints, observe, render
from fsdp_load_checks.checks import verdicts
from fsdp_load_checks.parent import stop
from fsdp_load_checks.parent.diagnosis import lost_ranks
from fsdp_load_checks.parent.launch import PORT_RETRIES, launch_once
from fsdp_load_checks.parent.reference_process import ReferenceProcess, SetupError
from fsdp_load_checks.parent.reload import reload_saved
from fsdp_load_checks.parent.watchdog import read_progress
from fsdp_load_checks.records import Case, CaseResult, CaseRun, LaunchConfig, LostRank, NotRun, Phase, RankTask
from fsdp_load_checks.records.protocol import reference_path, result_path


GPU_LOCK = Path(tempfile.gettempdir()) / "fsdp-load-checks-gpus.lock"


@dataclass
class HangBudget:
    """How many launches of a batch may hang in one phase before the cases left are not launched.

    A regression that hangs every case would otherwise cost start-up plus the case timeout per case
    (hours for the zoo); the first hangs already say all there is to say.
    """

    allowed: int  # --fsdp-hang-budget
    hangs: dict[Phase, list[LostRank]] = field(default_factory=dict)  # phase -> the rank behind each hang there

    def spend(self, behind: LostRank) -> NotRun | None:
        """Count a launch that hung, `behind` its rank to blame; once spent, the NotRun for every case left."""
        seen = self.hangs.setdefault(behind.phase, [])
        seen.append(behind)
        return NotRun(behind.phase, len(seen), seen[0]) if len(seen) >= self.allowed else None


def read_run(task: RankTask, out_dir: Path, cfg: LaunchConfig) -> CaseRun:
    """What the ranks of one launch left for one case: the result files present."""
    run_ = CaseRun(task.case, cfg.world_size, launch_dir=str(out_dir))
    for r in range(cfg.world_size):
        path = result_path(out_dir, task.case, r)
        if path.exists():
            run_.observations[r] = observe.read(str(path))
    return run_


def run_tasks(tasks: list[RankTask], cfg: LaunchConfig, work_dir: Path, on_progress: Callable | None = None,
              runs: dict[str, CaseRun] | None = None) -> dict[str, CaseRun]:
    """Run every task, relaunching after a crash or hang for the cases left; one CaseRun per case, into `runs`.

    A case no missing rank reached (the launch ended after the case before it, e.g. ranks that disagreed
    about that case exit) is launched again, not reported lost.

    Once `cfg.hang_budget` launches have hung in one phase, the cases left are not launched: each
    gets a `NotRun` naming the first of those hangs. On a signal (stop.Stopped) the cases whose every
    rank finished are in `runs` before the exception goes on.
    """
    runs = {} if runs is None else runs
    budget = HangBudget(cfg.hang_budget)
    remaining = list(tasks)
    work_dir.mkdir(parents=True, exist_ok=True)
    while remaining:
        out_dir = Path(tempfile.mkdtemp(prefix="launch-", dir=work_dir))
        try:
            watch = launch_once(remaining, out_dir, cfg, on_progress)
        except stop.Stopped:
            for task in remaining:  # in order: a case after an unfinished one never ran
                run_ = read_run(task, out_dir, cfg)
                if len(run_.observations) < cfg.world_size:
                    break
                runs[task.case] = run_
            raise
        reached_any = any((read_progress(out_dir, r) or {}).get("case") for r in range(cfg.world_size))
        for i, task in enumerate(remaining):
            run_ = runs[task.case] = read_run(task, out_dir, cfg)
            missing = [r for r in range(cfg.world_size) if r not in run_.observations]
            if not missing:
                continue
            lost = lost_ranks(task.case, missing, out_dir, cfg, watch, PORT_RETRIES)
            if i > 0 and not watch.case_timeout and all(x.phase_case for x in lost):
                # no missing rank ever reached this case: the launch ended after the one before (ranks that
                # disagree about a case exit, and whether a slow peer writes its result first is a race)
                del runs[task.case]
                remaining = remaining[i:]
                break
            run_.lost = lost
            later = remaining = remaining[i + 1 :]
            if not reached_any:
                # nothing ever started: the same failure would repeat for every case
                for task_ in later:
                    runs[task_.case] = CaseRun(task_.case, cfg.world_size, lost=run_.lost, launch_dir=str(out_dir))
                remaining = []
            elif watch.case_timeout:
                skip = budget.spend(run_.lost[0])  # lost_ranks lists the rank to blame first
                if skip is not None:
                    for task_ in later:
                        runs[task_.case] = CaseRun(task_.case, cfg.world_size, not_run=skip)
                    remaining = []
            break
        else:
            remaining = []
    return runs


def materialize(root: Path, cases: list[Case], timeout_s: float, run_config: str = accelerate_config.DEFAULT) -> None:
    """Build checkpoints and reference observations in a fresh interpreter (the reference process), and nothing else."""
    with ReferenceProcess(root, cases, run_config) as reference:
        reference.built(timeout_s)


def task_for(root: Path, case: Case) -> RankTask:
    """What the ranks are told of a case; one under its own accelerate config (`Case.under`) carries the config's
    environment, and the ranks switch to it for that case (rank/prepare.py `remake_accelerator`)."""
    env = accelerate_config.load(case.accelerate_config).env if case.accelerate_config else None
    return RankTask(case.name, str(checkpoints.checkpoint_dir(root, case)), case.dtype, list(case.imports), case.seed,
                    case.fault, case.model_class, case.after_loading, case.loader, case.poison, case.accelerate_config,
                    env)


def run_batch(root: Path, cases: list[Case], cfg: LaunchConfig, on_progress: Callable | None = None) -> dict[str, CaseResult]:
    """Checkpoints and references, one launch (more after a crash or hang), every verdict."""
    timeout_s = cfg.startup_timeout_s + cfg.case_timeout_s * len(cases)
    with ReferenceProcess(root, cases, cfg.accelerate_config) as reference:  # ended on leaving, by any way
        reference.checkpoints_built(timeout_s)  # the plain loads are observed while the ranks run
        return _launch_and_judge(root, cases, cfg, reference, timeout_s, on_progress)


def _launch_and_judge(root: Path, cases: list[Case], cfg: LaunchConfig, reference: ReferenceProcess, timeout_s: float,
                      on_progress: Callable | None) -> dict[str, CaseResult]:
    tasks = [task_for(root, case) for case in cases]  # every accelerate config in one launch (RankTask.accelerate_env)
    # every nccl rank owns a GPU: concurrent launches (pytest-xdist workers) take the GPUs in turn
    gpus = FileLock(str(GPU_LOCK)) if cfg.backend == "nccl" else contextlib.nullcontext()
    runs: dict[str, CaseRun] = {}
    try:
        with gpus:
            run_tasks(tasks, cfg, root / "launches" / cfg.loader, on_progress, runs)
        reference.built(timeout_s)  # every plain load, before the verdicts and the reloads that follow them
        reload_saved(runs, {c.name: c for c in cases}, reference, timeout_s)  # the state-dict check's plain reload
    except stop.Stopped as stopped:  # every process is gone; the cases complete by then still get verdicts
        # complete: every rank's result and the plain load (observed while the ranks ran) are on disk
        done = [c for c in cases if c.name in runs and reference_path(root, c.reference_name).exists()]
        stopped.results = judge(root, done, runs)
        raise
    return judge(root, cases, runs)


def judge(root: Path, cases: list[Case], runs: dict[str, CaseRun]) -> dict[str, CaseResult]:
    """Every case's verdicts, from its run and its reference observation."""
    results = {}
    for case in cases:
        ref_file = reference_path(root, case.reference_name)
        ref = observe.read(str(ref_file)) if ref_file.exists() else None
        run = runs[case.name]
        found = verdicts(run, ref)
        for verdict in found.values():
            verdict.details = render.details(verdict, run, ref)
        results[case.name] = CaseResult(case.name, run, ref, found)
    return results


def by_loader(cases: list[Case], results: dict[str, CaseResult], loader: str) -> dict[str, dict[str, CaseResult]]:
    """A batch's results per loader (a loader variant's own, `loader` for the rest: the batch's), each under the
    name of the case it varies (`Case.reference_name`: a variant's base, any other case's own name)."""
    out: dict[str, dict[str, CaseResult]] = {}
    for case in cases:
        out.setdefault(case.loader or loader, {})[case.reference_name] = results[case.name]
    return out


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
