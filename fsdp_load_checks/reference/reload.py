"""The plain reload of what rank 0's `save_pretrained` wrote, once per batch, after its launches.

Run by the batch's reference process (reference/__main__.py), which made the
plain loads before the launch and waits for this. Each job names a case and
the directory rank 0's `save_pretrained` wrote. In an interpreter without
FSDP, env flags or a process group, as a user loads a saved model, the case's class (`Case.model_class`) loads it with `from_pretrained(directory, dtype=<the case's dtype>)`, and
the result records both what the files hold (safetensors, as stored) and
the loaded model's `state_dict()`. One result file per job (records.Reload,
written atomically, any exception recorded in it); the directory is
deleted once read, so a big checkpoint does not outlive its check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from fsdp_load_checks import model_class, observe, state_dicts
from fsdp_load_checks.catalogue import import_all
from fsdp_load_checks.records import Case, Phase, Reload


def reload(case: Case, directory: Path) -> Reload:
    import_all(case.imports)
    model = model_class.resolve(case.model_class).from_pretrained(directory, dtype=getattr(torch, case.dtype))
    kinds = state_dicts.kinds_of(model)
    return Reload(saved=state_dicts.saved_records(directory, kinds), state_dict=state_dicts.records(model.state_dict(), kinds))


def run_jobs(jobs_file: Path, catalogue: dict[str, Case]) -> None:
    """Each job of JOBS_JSON (a list of {"case", "directory", "out"}): reload, write the result, delete the directory."""
    for job in json.loads(jobs_file.read_text()):
        directory = Path(job["directory"])
        try:
            found = reload(catalogue[job["case"]], directory)
        except Exception as exc:  # recorded: the state-dict check reports it against the case
            found = Reload(failure=observe.failure_from(exc, -1, Phase.RELOAD))
        observe.write_reload(found, job["out"])
        shutil.rmtree(directory, ignore_errors=True)
