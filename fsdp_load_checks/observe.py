"""What a process saw in its model: the data that crosses from ranks to the parent.

The same `observe_model` runs on every FSDP2 rank and on the plain
single-process reference, so the checks compare like with like. Ranks only
record; verdicts are made in the parent by `checks.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fsdp_load_checks.memory import MemoryProfile, PhaseMemory

PARAMETER = "parameter"
BUFFER = "persistent buffer"
NON_PERSISTENT = "non-persistent buffer"

BATCH, SEQ = 2, 8


@dataclass
class TensorRecord:
    name: str
    kind: str  # PARAMETER | BUFFER | NON_PERSISTENT
    dtype: str
    shape: tuple[int, ...]
    device: str
    nan: int
    inf: int
    digest: str  # sha256 of the raw bytes; equal digests mean bit-equal tensors
    value: torch.Tensor | None  # full tensor on CPU, for tensors up to VALUE_LIMIT_BYTES
    sample: torch.Tensor | None = None  # SAMPLE_SIZE evenly strided elements, for bigger tensors


@dataclass
class Failure:
    """An exception a process raised, with the phase it was in."""

    rank: int
    phase: str
    exc_type: str
    message: str
    traceback: str

    def one_line(self) -> str:
        return f"rank {self.rank} raised {self.exc_type}: {self.message} (during {self.phase})"


def set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)


@dataclass
class Observation:
    case: str
    rank: int  # -1 for the single-process reference
    world_size: int
    tensors: dict[str, TensorRecord] = field(default_factory=dict)
    ties: list[tuple[str, ...]] = field(default_factory=list)  # names sharing one parameter
    logits: torch.Tensor | None = None
    missing_keys: tuple[str, ...] = ()  # reference only: keys the checkpoint did not have
    # reference only: non-persistent buffers whose plain-load value differs from the model's own
    # __init__ value (the plain-load record is kept here; `tensors` holds the __init__ value)
    init_mismatch: dict[str, TensorRecord] = field(default_factory=dict)
    memory: MemoryProfile = field(default_factory=MemoryProfile)  # ranks only
    failure: Failure | None = None
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failure is None


def digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    if t.dim() == 0:
        t = t.reshape(1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:32]


# Above this, a record keeps the digest and a strided sample, not the tensor: a big checkpoint must not
# be copied once per rank into result files and the parent's memory. Equality is still exact (digest);
# only the description of a difference becomes sampled.
VALUE_LIMIT_BYTES = 1 << 20
SAMPLE_SIZE = 64


def strided_sample(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, min(SAMPLE_SIZE, flat.numel())).long()
    return flat[index].clone()


def record(name: str, kind: str, tensor: torch.Tensor) -> TensorRecord:
    from torch.distributed.tensor import DTensor

    device = str(tensor.device)
    if tensor.device.type == "meta":  # never materialised: nothing to compare, and that is the finding
        dtype = str(tensor.dtype).removeprefix("torch.")
        return TensorRecord(name, kind, dtype, tuple(tensor.shape), device, 0, 0, "meta", None)
    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    full = full.detach().cpu()
    floating = full.is_floating_point() or full.is_complex()
    return TensorRecord(
        name=name,
        kind=kind,
        dtype=str(full.dtype).removeprefix("torch."),
        shape=tuple(full.shape),
        device=device,
        nan=int(torch.isnan(full).sum()) if floating else 0,
        inf=int(torch.isinf(full).sum()) if floating else 0,
        digest=digest(full),
        value=full.clone() if full.numel() * full.element_size() <= VALUE_LIMIT_BYTES else None,
        sample=None if full.numel() * full.element_size() <= VALUE_LIMIT_BYTES else strided_sample(full),
    )


def non_persistent_names(model: torch.nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        names.update(prefix + b for b in module._non_persistent_buffers_set)
    return names


def observe_tensors(
    model: torch.nn.Module, before_gather: Callable[[], None] | None = None
) -> tuple[dict[str, TensorRecord], list[tuple[str, ...]]]:
    """Every parameter and buffer under every name it is registered as.

    Gathering DTensors is a collective, so every rank must walk the same
    names in the same order: module registration order is the same on all.
    """
    tensors: dict[str, TensorRecord] = {}
    by_identity: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_identity.setdefault(id(param), []).append(name)
        if before_gather:
            before_gather()
        tensors[name] = record(name, PARAMETER, param)
    non_persistent = non_persistent_names(model)
    for name, buf in model.named_buffers(remove_duplicate=False):
        if before_gather:
            before_gather()
        tensors[name] = record(name, NON_PERSISTENT if name in non_persistent else BUFFER, buf)
    ties = [tuple(names) for names in by_identity.values() if len(names) > 1]
    return tensors, ties


def forward_input(vocab_size: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(BATCH * SEQ) % vocab_size).view(BATCH, SEQ).to(device)


@torch.no_grad()
def forward_logits(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    out = model(input_ids=forward_input(vocab, device))
    return out.logits.detach().float().cpu()


def failure_from(exc: BaseException, rank: int, phase: str) -> Failure:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Failure(
        rank=rank,
        phase=phase,
        exc_type=type(exc).__name__,
        message=message,
        traceback="".join(traceback.format_exception(exc)),
    )


def write(obs: Observation, path: str) -> None:
    """Atomic: a result file that exists is complete."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(dataclasses.asdict(obs), tmp)
    os.replace(tmp, path)


def read(path: str) -> Observation:
    raw = torch.load(path, weights_only=False)
    raw["tensors"] = {k: TensorRecord(**v) for k, v in raw["tensors"].items()}
    raw["ties"] = [tuple(t) for t in raw["ties"]]
    raw["missing_keys"] = tuple(raw["missing_keys"])
    raw["init_mismatch"] = {k: TensorRecord(**v) for k, v in raw["init_mismatch"].items()}
    mem = raw["memory"]
    mem["phases"] = {k: PhaseMemory(**v) for k, v in mem["phases"].items()}
    raw["memory"] = MemoryProfile(**mem)
    if raw["failure"] is not None:
        raw["failure"] = Failure(**raw["failure"])
    return Observation(**raw)


def stack_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out
