"""The rank side: one process per rank, started by torchrun, running a batch of cases.

Each case: loader under test -> `from_pretrained` -> FSDP2 prepare ->
observe -> one result file per (case, rank), written atomically. After each
case the ranks compare notes through the rendezvous store: if one failed
and the others did not (or cannot answer), continuing could leave
collectives mismatched, so the rank exits non-zero, torchrun stops its
peers, and the parent relaunches the cases left.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

PG_TIMEOUT_MARGIN_S = 60.0
EXIT_DIVERGED = 3  # ranks disagreed about a case; the parent relaunches what is left


@dataclass
class RankTask:
    case: str
    checkpoint: str
    dtype: str
    imports: list[str] = field(default_factory=list)
    seed: int = 0
    fault: str | None = None  # harness self-tests only: see faults.py


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

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> LaunchSpec:
        raw = json.loads(Path(path).read_text())
        raw["tasks"] = [RankTask(**t) for t in raw["tasks"]]
        return cls(**raw)


def result_path(out_dir: Path, case: str, rank: int) -> Path:
    return Path(out_dir) / f"{case}.rank{rank}.pt"


def progress_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"rank{rank}.progress"


def log_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"rank{rank}.log"


class Progress:
    """Where this rank is, for the parent's timeout and crash reports."""

    def __init__(self, out_dir: Path, rank: int):
        self.path = progress_path(out_dir, rank)
        self.rank = rank
        self.case = ""
        self.phase = ""
        self.step = 0  # collectives announced in this phase: the rank furthest behind is the one that hangs
        self.fault: str | None = None

    def __call__(self, phase: str, case: str | None = None, fault: str | None = None) -> None:
        from fsdp_load_checks import faults

        if case is not None:
            self.case, self.fault = case, fault
        self.phase, self.step = phase, 0
        self._write()
        faults.fire(self.fault, phase, self.rank)

    def tick(self) -> None:
        """Called before each collective, so a peer blocked in it is seen ahead of the rank that never came."""
        self.step += 1
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        state = {"pid": os.getpid(), "case": self.case, "phase": self.phase, "step": self.step, "since": time.time()}
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)


class HarnessError(RuntimeError):
    """The rank is not exercising the path under test: a bug of the suite, never a verdict on the loader."""


def assert_path_under_test() -> None:
    """transformers must see FSDP + cpu_ram_efficient_loading, or every check passes vacuously.

    accelerate's plugin rewrites the env flags as a side effect (see prepare.fresh_plugin); this
    catches that, and anything like it, on every case, on every rank.
    """
    from transformers.modeling_utils import is_fsdp_enabled

    if not is_fsdp_enabled():
        flags = {k: os.environ.get(k) for k in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")}
        raise HarnessError(f"transformers does not see FSDP cpu_ram_efficient_loading enabled ({flags}): harness bug")


def run_case(task: RankTask, spec: LaunchSpec, accelerator, device, progress: Progress):
    import torch
    from transformers import AutoModelForCausalLM

    from fsdp_load_checks import loaders, observe
    from fsdp_load_checks.cases import import_all
    from fsdp_load_checks.checkpoints import model_bytes
    from fsdp_load_checks.memory import MemoryProfile, Sampler
    from fsdp_load_checks.poison import poisoned
    from fsdp_load_checks.prepare import prepare_fsdp2

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    obs = observe.Observation(case=task.case, rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    obs.versions = observe.stack_versions()
    obs.memory = MemoryProfile(model_bytes=model_bytes(task.checkpoint), local_rank=local_rank, poisoned=spec.poison)
    phase = "import"
    model = None
    try:
        with Sampler(obs.memory, cuda=device.type == "cuda") as memory:
            import_all(tuple(task.imports))
            with loaders.get(spec.loader).patch():
                phase = "from_pretrained"
                progress(phase, task.case, task.fault)
                memory.phase(phase)
                assert_path_under_test()
                torch.manual_seed(task.seed)  # keys missing from the checkpoint: rank 0 draws what the reference draws
                with poisoned(local_rank == 0 or spec.poison):  # the loading rank (one per node)
                    model = AutoModelForCausalLM.from_pretrained(task.checkpoint, dtype=getattr(torch, task.dtype))
                phase = "fsdp2_prepare"
                progress(phase)
                memory.phase(phase)
                model = prepare_fsdp2(accelerator, model, device)
            phase = "observe"
            progress(phase)
            memory.phase(phase)
            obs.tensors, obs.ties = observe.observe_tensors(model, before_gather=progress.tick)
            phase = "forward"
            progress(phase)
            memory.phase(phase)
            obs.logits = observe.forward_logits(model, device)
    except Exception as exc:  # recorded with the rank and phase; the parent decides
        obs.failure = observe.failure_from(exc, rank, phase)
    finally:
        del model
        accelerator.free_memory()  # drops the references Accelerator.prepare keeps
        gc.collect()
    return obs


def in_step(obs, index: int, spec: LaunchSpec) -> bool:
    """True when every rank ended case `index` the same way (all fine, or all raised the same).

    Statuses go through the rendezvous store, not a collective: a peer stuck
    in a broadcast never answers, and a rank that failed gives up after
    `control_timeout_s` instead of waiting for the process-group timeout.
    """
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    mine = "ok" if obs.ok else f"{obs.failure.exc_type}@{obs.failure.phase}"
    keys = [f"fsdp-load-checks/status/{index}/{r}" for r in range(dist.get_world_size())]
    store.set(keys[dist.get_rank()], mine)
    try:
        store.wait(keys, timedelta(seconds=spec.case_timeout_s if obs.ok else spec.control_timeout_s))
    except Exception:
        return False
    return all(store.get(k).decode() == mine for k in keys)


def main(argv: list[str]) -> None:
    spec = LaunchSpec.load(Path(argv[0]))
    out_dir = Path(spec.out_dir)
    rank = int(os.environ["RANK"])
    log = open(log_path(out_dir, rank), "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    progress = Progress(out_dir, rank)
    progress("startup")

    import torch
    import torch.distributed as dist

    from fsdp_load_checks import observe
    from fsdp_load_checks.prepare import make_accelerator, set_env_flags

    if spec.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # longer than the parent's per-case watchdog, so a hang is reported by the parent, naming the rank behind,
    # rather than as a collective timeout on the rank that was waiting for it
    dist.init_process_group(spec.backend, timeout=timedelta(seconds=spec.case_timeout_s + PG_TIMEOUT_MARGIN_S))
    set_env_flags()
    accelerator = make_accelerator(device) if spec.tasks else None  # an empty launch only proves the rendezvous

    code = 0
    for index, task in enumerate(spec.tasks):
        obs = run_case(task, spec, accelerator, device, progress)
        observe.write(obs, str(result_path(out_dir, task.case, rank)))
        progress("done", task.case)
        if not in_step(obs, index, spec):
            code = EXIT_DIVERGED
            break
    progress("exit")
    sys.stdout.flush()
    sys.stderr.flush()
    log.flush()
    # interpreter teardown after gloo occasionally aborts (SIGABRT); the results are already on disk
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
