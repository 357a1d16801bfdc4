"""After a batch's launches: have what rank 0's save_pretrained wrote loaded back plain, outside FSDP.

The batch's reference process (parent/reference_process.py) reloads every
case whose rank 0 wrote a directory; each CaseRun gets its `records.Reload`.
If that process itself cannot, every job gets the same failure, so the state-dict check says why it could not judge.
"""

from __future__ import annotations

import json
from pathlib import Path

from fsdp_load_checks import observe
from fsdp_load_checks.parent.reference_process import ReferenceProcess
from fsdp_load_checks.records import Case, CaseRun, Failure, Phase, Reload


def reload_saved(runs: dict[str, CaseRun], cases: dict[str, Case], reference: ReferenceProcess, timeout_s: float) -> None:
    """Attach to each run the plain reload of its rank 0's save_pretrained directory (runs without one: none),
    made by the batch's reference process, as the case (`cases[name]`) is loaded there: a loader variant as the
    case it varies (the reference process knows cases by their catalogue name)."""
    jobs, names = [], []
    for name, run in runs.items():
        rank0 = run.observations.get(0)
        if rank0 is None or not rank0.saved_dir:
            continue
        if Path(rank0.saved_dir).is_dir():
            out = f"{rank0.saved_dir}.reload.pt"
            jobs.append({"case": cases[name].reference_name, "directory": rank0.saved_dir, "out": out})
            names.append(name)
        else:  # said it saved, left nothing: judged as a failed reload, never as nothing to judge
            gone = f"rank 0's save_pretrained directory {rank0.saved_dir} does not exist"
            run.reload = Reload(failure=Failure(-1, Phase.RELOAD, "FileNotFoundError", gone, ""))
    if not jobs:
        return
    spec = Path(jobs[0]["directory"]).parents[2] / "reload-jobs.json"  # the first job's launch directory
    spec.write_text(json.dumps(jobs))
    why = reference.reload(spec, timeout_s)
    for name, job in zip(names, jobs):
        out = Path(job["out"])
        if out.exists():
            runs[name].reload = observe.read_reload(str(out))
        else:
            failure = Failure(-1, Phase.RELOAD, "ReloadProcessFailed", why or "no result written", "")
            runs[name].reload = Reload(failure=failure)
