"""One run of the suite: checkpoints and references, the launch, the verdicts.

Shared by the pytest plugin and the CLI. Results are stored under the run
directory behind a file lock per batch, so several pytest-xdist workers
asking for the same cases launch them once.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from fsdp_load_checks import checkpoints, known_issues, launch, observe
from fsdp_load_checks.cases import Case
from fsdp_load_checks.checks import Verdict, verdicts
from fsdp_load_checks.rank import RankTask
from fsdp_load_checks.reference import reference_path


class SetupError(RuntimeError):
    """The environment, not a case, is broken (the reference process could not even run)."""


@dataclass
class CaseResult:
    case: str
    run: launch.CaseRun
    reference: observe.Observation | None
    verdicts: dict[str, Verdict]

    def outcomes(self, case: Case, loader: str) -> dict[str, known_issues.Outcome]:
        """Each check's verdict read against the known upstream issues of the installed stack."""
        versions = self.reference.versions if self.reference else observe.stack_versions()
        return {name: known_issues.classify(case, v, versions, loader=loader) for name, v in self.verdicts.items()}


GPU_LOCK = Path(tempfile.gettempdir()) / "fsdp-load-checks-gpus.lock"


def materialize(root: Path, cases: list[Case], timeout_s: float) -> None:
    """Build checkpoints and reference observations in a fresh interpreter."""
    cmd = [sys.executable, "-m", "fsdp_load_checks.reference", str(root), *(c.name for c in cases)]
    env = launch.rank_env()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise SetupError(f"building checkpoints/references took more than {timeout_s:g}s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SetupError(f"building checkpoints/references failed: {last}\n{proc.stderr[-4000:]}")


def run_batch(root: Path, cases: list[Case], cfg: launch.LaunchConfig, on_progress=None) -> dict[str, CaseResult]:
    materialize(root, cases, timeout_s=cfg.startup_timeout_s + cfg.case_timeout_s * len(cases))
    tasks = [
        RankTask(c.name, str(checkpoints.checkpoint_dir(root, c)), c.dtype, list(c.imports), c.seed, c.fault)
        for c in cases
    ]
    # every nccl rank owns a GPU: concurrent launches (pytest-xdist workers) take the GPUs in turn
    gpus = FileLock(str(GPU_LOCK)) if cfg.backend == "nccl" else contextlib.nullcontext()
    with gpus:
        runs = launch.run(tasks, cfg, root / "launches" / cfg.loader, on_progress)
    results = {}
    for case in cases:
        ref_file = reference_path(root, case.name)
        ref = observe.read(str(ref_file)) if ref_file.exists() else None
        run = runs[case.name]
        results[case.name] = CaseResult(case.name, run, ref, verdicts(run, ref))
    return results


def run_batch_once(root: Path, key: str, cases: list[Case], cfg: launch.LaunchConfig) -> dict[str, CaseResult]:
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
