"""The parent/rank protocol: what the parent writes for a launch and where every file of it lives.

The parent writes `spec.json`; each rank writes its progress file (where it
is, for the watchdog: rewritten in place, a torn read is read again), its
log, and one result file per case, atomically.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

EXIT_DIVERGED = 3  # ranks disagreed about a case; the parent relaunches what is left

# the reference process's lines on stdout under --serve (reference/__main__.py): the checkpoints are on disk (a
# launch may start), every plain load is observed (the verdicts may be made), then one per reload job file
REFERENCE_CHECKPOINTS = "CHECKPOINTS"
REFERENCE_BUILT = "BUILT"
REFERENCE_RELOADED = "RELOADED"


@dataclass
class LaunchConfig:
    """How the parent launches ranks (never sent to them: they get a LaunchSpec); built by options.launch_config."""

    nproc: int = 2
    loader: str = "stock"
    backend: str = "gloo"
    case_timeout_s: float = 120.0
    startup_timeout_s: float = 300.0
    control_timeout_s: float = 5.0
    poison: bool = False  # --poison-uninitialized: NaN-fill uninitialised memory on every rank
    nnodes: int = 1  # >1: that many torchrun agents on this machine, one per simulated node
    accelerate_config: str = "fsdp2"  # --accelerate-config: a shipped config's name or a YAML path
    # what `accelerate launch --config_file` would export for it (ACCELERATE_*, FSDP_*): accelerate_config.load
    accelerate_env: dict[str, str] = field(default_factory=dict)
    hang_budget: int = 2  # launches of a batch that may hang in one phase before the cases left are not run

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


@dataclass
class RankTask:
    case: str
    checkpoint: str  # directory
    dtype: str
    imports: list[str] = field(default_factory=list)
    seed: int = 0
    fault: str | None = None  # harness self-tests only: see fsdp_load_checks/rank/faults.py
    model_class: str = "AutoModelForCausalLM"  # the class from_pretrained is called on (records.Case.model_class)
    after_loading: bool = True  # records.Case.after_loading
    loader: str | None = None  # records.Case.loader: None is the launch's (LaunchSpec.loader)
    poison: bool = False  # records.Case.poison
    # records.Case.under: a case under its own accelerate config (name, and the env it exports); None: the launch's
    accelerate_config: str | None = None
    accelerate_env: dict[str, str] | None = None


@dataclass
class LaunchSpec:
    """Written by the parent as JSON; read by every rank."""

    tasks: list[RankTask]
    out_dir: str
    loader: str = "stock"
    backend: str = "gloo"
    case_timeout_s: float = 120.0
    control_timeout_s: float = 5.0  # how long a rank that raised waits to learn whether its peers did too
    poison: bool = False  # poison uninitialised memory on every rank, not only rank 0
    accelerate_config: str = "fsdp2"  # the config's name, for the observations
    accelerate_env: dict[str, str] = field(default_factory=dict)  # exported by every rank after init

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    def for_task(self, task: RankTask) -> LaunchSpec:
        """The spec as one task runs under it: its own accelerate config where it has one."""
        if task.accelerate_env is None:
            return self
        return replace(self, accelerate_config=task.accelerate_config or self.accelerate_config,
                       accelerate_env=task.accelerate_env)

    @classmethod
    def load(cls, path: Path) -> LaunchSpec:
        raw = json.loads(Path(path).read_text())
        raw["tasks"] = [RankTask(**t) for t in raw["tasks"]]
        return cls(**raw)


def spec_path(out_dir: Path) -> Path:
    return Path(out_dir) / "spec.json"


def result_path(out_dir: Path, case: str, rank: int) -> Path:
    return Path(out_dir) / f"{case}.rank{rank}.pt"


def progress_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"rank{rank}.progress"


def encode_progress(state: dict) -> bytes:
    """A rank's progress record: `state` as JSON, a newline, the JSON's CRC32 as 8 hex digits.

    The rank rewrites its record in place (rank/progress.py), so a reader racing the write can see old and new
    bytes mixed, which can still parse as JSON with wrong or missing keys: the CRC tells `decode_progress`."""
    payload = json.dumps(state).encode()
    return payload + b"\n" + format(zlib.crc32(payload), "08x").encode()


def decode_progress(raw: bytes) -> dict | None:
    """The state of a record `encode_progress` wrote (trailing padding ignored); None when `raw` is empty (the
    file is created, not yet written). ValueError: torn (old and new bytes mixed; read again)."""
    text = raw.rstrip()
    if not text:
        return None
    payload, _, crc = text.rpartition(b"\n")
    if int(crc, 16) != zlib.crc32(payload):  # int() raises ValueError on a torn CRC line itself
        raise ValueError(f"torn progress record ({len(raw)} bytes)")
    return json.loads(payload)


def log_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"rank{rank}.log"


def launch_log(out_dir: Path, node: int) -> Path:
    """torchrun's own output, one file per agent (simulated node)."""
    return Path(out_dir) / ("launch.log" if node == 0 else f"launch.node{node}.log")


def reference_path(root: Path, case_name: str) -> Path:
    """The single-process reference observation of a case, under a run's root."""
    return Path(root) / "reference" / f"{case_name}.pt"
