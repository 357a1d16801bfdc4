"""The bottom layer: plain data that crosses process boundaries, and the parent/rank protocol.

Nothing here imports the rest of the project (an import-linter contract in
pyproject.toml keeps it so), and nothing here imports torch: tensors appear
only as field values, annotated lazily. Every other module, the toy models
included, may import from here; this layer imports nothing back.

  case.py         Case: the recipe for a checkpoint, and the tags known issues select by
  observation.py  what a process saw: TensorRecord, Failure, memory per phase, TrainStep, Reload, Observation
  outcome.py      what the parent concluded: LostRank, NotRun, CaseRun, Problem, Verdict, Outcome, CaseResult
  protocol.py     the parent/rank protocol: LaunchConfig, RankTask, LaunchSpec, run-directory paths, exit codes
  enums.py        Phase, TensorKind, ProblemKind, LostHow, Status, Against, Quantity
"""

from fsdp_load_checks.records.case import BIG, PERSISTENT_BUFFER, Case
from fsdp_load_checks.records.enums import (
    Against,
    LostHow,
    Phase,
    ProblemKind,
    Quantity,
    Status,
    TensorKind,
)
from fsdp_load_checks.records.observation import (
    Failure,
    MemoryProfile,
    Observation,
    PhaseMemory,
    Reload,
    TensorRecord,
    TrainStep,
)
from fsdp_load_checks.records.outcome import (
    CaseResult,
    CaseRun,
    Difference,
    KnownIssue,
    LostRank,
    MemoryExcess,
    NotRun,
    Outcome,
    Problem,
    Symptom,
    Verdict,
)
from fsdp_load_checks.records.protocol import LaunchConfig, LaunchSpec, RankTask

__all__ = [
    "BIG",
    "PERSISTENT_BUFFER",
    "Against",
    "Case",
    "CaseResult",
    "CaseRun",
    "Difference",
    "Failure",
    "KnownIssue",
    "LaunchConfig",
    "LaunchSpec",
    "LostHow",
    "LostRank",
    "MemoryExcess",
    "MemoryProfile",
    "NotRun",
    "Observation",
    "Outcome",
    "Phase",
    "PhaseMemory",
    "Problem",
    "ProblemKind",
    "Quantity",
    "RankTask",
    "Reload",
    "Status",
    "Symptom",
    "TensorKind",
    "TensorRecord",
    "TrainStep",
    "Verdict",
]
