"""Recording what a process holds: runs inside every rank and inside the reference process.

The same `observe_tensors` and `forward_output` run on every FSDP2 rank and
on the plain single-process load, so the checks compare like with like.
Processes only record; verdicts are made in the parent (checks.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import traceback
from collections.abc import Callable

import torch

from fsdp_load_checks.records import (
    Failure,
    MemoryProfile,
    Observation,
    Phase,
    PhaseMemory,
    Reload,
    TensorKind,
    TensorRecord,
    TrainStep,
)
from fsdp_load_checks.gather import full_tensors
from fsdp_load_checks.inputs import model_inputs
from fsdp_load_checks.tensors import non_persistent_names

BATCH, SEQ = 2, 8  # the forward pass's input_ids shape

# Above this, a record keeps the digest and a strided sample, not the tensor: a big checkpoint must not
# be copied once per rank into result files and the parent's memory. Equality is still exact (digest);
# only the description of a difference becomes sampled.
VALUE_LIMIT_BYTES = 1 << 20
SAMPLE_SIZE = 64


def digest(t: torch.Tensor) -> str:
    """sha256 (32 hex digits) of the tensor's raw bytes: equal digests mean bit-equal tensors."""
    t = t.detach().contiguous().cpu()
    if t.dim() == 0:
        t = t.reshape(1)
    return hashlib.sha256(memoryview(t.view(torch.uint8).numpy())).hexdigest()[:32]  # hashed in place, no copy


def strided_sample(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, min(SAMPLE_SIZE, flat.numel())).long()
    return flat[index].clone()


def record(name: str, kind: TensorKind, tensor: torch.Tensor) -> TensorRecord:
    """A record of one full tensor (a plain tensor, or a meta tensor of any kind); local, no collective.

    A rank's DTensors are gathered before (gather.full_tensors: the
    collective every rank makes alike). TypeError for a materialised DTensor.
    """
    from torch.distributed.tensor import DTensor

    device = str(tensor.device)
    if tensor.device.type == "meta":  # never materialised: nothing to compare, and that is the finding
        dtype = str(tensor.dtype).removeprefix("torch.")
        return TensorRecord(name, kind, dtype, tuple(tensor.shape), device, 0, 0, "meta", None)
    if isinstance(tensor, DTensor):
        raise TypeError(f"{name} is a DTensor: gather it first (gather.full_tensors), record takes full tensors")
    full = tensor.detach().cpu()
    floating = full.is_floating_point() or full.is_complex()
    # a NaN or Inf anywhere makes the sum non-finite, and a sum is ~30x cheaper than counting; only a non-finite
    # sum (or one that overflowed) pays for the exact counts
    finite = bool(torch.isfinite(full.sum())) if floating and full.numel() and full.element_size() > 1 else not floating
    small = full.numel() * full.element_size() <= VALUE_LIMIT_BYTES
    return TensorRecord(
        name=name,
        kind=kind,
        dtype=str(full.dtype).removeprefix("torch."),
        shape=tuple(full.shape),
        device=device,
        nan=int(torch.isnan(full).sum()) if floating and not finite else 0,
        inf=int(torch.isinf(full).sum()) if floating and not finite else 0,
        digest=digest(full),
        value=full.clone() if small else None,
        sample=None if small else strided_sample(full),
    )


def record_gathered(items: list[tuple[str, torch.Tensor]], kind_of: Callable[[str], TensorKind],
                    before_gather: Callable[[], None] | None = None, keep: bool = True) -> dict[str, TensorRecord]:
    """name -> record of each (name, tensor) item, in the items' order, each DTensor gathered whole first
    (gather.full_tensors: a collective, every rank walks the same items; small shards many per all-gather) and
    recorded one tensor (or one 1 MiB group) at a time. A rank with `keep=False` takes part and records nothing."""
    out = {}
    for name, full in full_tensors(items, before_gather):
        if keep:
            out[name] = record(name, kind_of(name), full)
    return {name: out[name] for name, _ in items if name in out}  # a group yields after the plain tensors behind it


def observe_tensors(
    model: torch.nn.Module, before_gather: Callable[[], None] | None = None
) -> tuple[dict[str, TensorRecord], list[tuple[str, ...]]]:
    """Every parameter and buffer under every name it is registered as, and the tied parameter names.

    Gathering DTensors is a collective (gather.full_tensors: small shards
    several per collective), so every rank must walk the same names in the
    same order: module registration order is the same on all.
    """
    by_identity: dict[int, list[str]] = {}
    named = []
    for name, param in model.named_parameters(remove_duplicate=False):
        by_identity.setdefault(id(param), []).append(name)
        named.append(((name, TensorKind.PARAMETER), param))
    non_persistent = non_persistent_names(model)
    for name, buf in model.named_buffers(remove_duplicate=False):
        named.append(((name, TensorKind.NON_PERSISTENT if name in non_persistent else TensorKind.BUFFER), buf))
    tensors = {name: record(name, kind, full) for (name, kind), full in full_tensors(named, before_gather)}
    ties = [tuple(names) for names in by_identity.values() if len(names) > 1]
    return tensors, ties


def forward_input(vocab_size: int, device: torch.device) -> torch.Tensor:
    """(BATCH, SEQ) token ids 0, 1, 2, ... modulo the vocabulary."""
    return (torch.arange(BATCH * SEQ) % vocab_size).view(BATCH, SEQ).to(device)


def forward_inputs(model: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """The forward check's keyword inputs: `forward_input` ids over the text vocabulary, by class (inputs.py)."""
    return model_inputs(model, forward_input(model.config.get_text_config().vocab_size, device))


# The output the forward check compares, by the first of these a model returns: a head's logits (causal LM,
# classifier, MLM), else a base model's last hidden state (AutoModel: LlamaModel, BertModel, ...).
PRIMARY_OUTPUTS = ("logits", "last_hidden_state")


def primary_output(out) -> tuple[str, torch.Tensor]:
    """(name, tensor) of a transformers ModelOutput's primary output; TypeError when it has none of PRIMARY_OUTPUTS."""
    for name in PRIMARY_OUTPUTS:
        value = getattr(out, name, None)
        if value is not None:
            return name, value
    raise TypeError(f"{type(out).__name__} has none of the outputs {', '.join(PRIMARY_OUTPUTS)} to compare")


@torch.no_grad()
def forward_output(
    model: torch.nn.Module, device: torch.device, output_dtype: torch.dtype | None = None
) -> tuple[str, torch.Tensor]:
    """The model's primary output on `forward_input`: its name and the tensor, float32 on CPU.

    Shape (BATCH, SEQ, vocab) for logits, (BATCH, SEQ, hidden) for a last
    hidden state; a classifier's logits are (BATCH, labels). With
    `output_dtype`, rounded through that dtype first (a mixed-precision
    policy's output_dtype).
    """
    name, value = primary_output(model(**forward_inputs(model, device)))
    value = value.detach()
    if output_dtype is not None:
        value = value.to(output_dtype)
    return name, value.float().cpu()


def forward_logits(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """The primary output's tensor only (`forward_output`): what every rank records; the reference names it."""
    return forward_output(model, device)[1]


def failure_from(exc: BaseException, rank: int, phase: Phase) -> Failure:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Failure(
        rank=rank,
        phase=phase,
        exc_type=type(exc).__name__,
        message=message,
        traceback="".join(traceback.format_exception(exc)),
    )


# gloo's words (third_party/gloo/gloo/transport/tcp/pair.cc) when the process at the other end of a collective
# exits: the rank that raised first leaves the launch, and its peers' pending collectives fail with these
PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe")


def peer_gone(failure: Failure) -> bool:
    """The failure is a collective broken by a peer that left (gloo's message), not this rank's own error."""
    return bool(PEER_GONE.search(failure.message))


def write(obs: Observation, path: str) -> None:
    """Atomic: a result file that exists is complete."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(dataclasses.asdict(obs), tmp)
    os.replace(tmp, path)


def read(path: str) -> Observation:
    raw = torch.load(path, weights_only=False)
    raw["tensors"] = {k: TensorRecord(**v) for k, v in raw["tensors"].items()}
    raw["ties"] = [tuple(t) for t in raw["ties"]]
    raw["inputs"] = tuple(raw.get("inputs", ("input_ids",)))
    raw["missing_keys"] = tuple(raw["missing_keys"])
    raw["init_mismatch"] = {k: TensorRecord(**v) for k, v in raw["init_mismatch"].items()}
    mem = raw["memory"]
    mem["phases"] = {k: PhaseMemory(**v) for k, v in mem["phases"].items()}
    raw["memory"] = MemoryProfile(**mem)
    if raw["failure"] is not None:
        raw["failure"] = Failure(**raw["failure"])
    for key in ("state_dict", "round_trip", "saved"):
        raw[key] = _records(raw.get(key, {}))
    if raw.get("train") is not None:
        train = raw["train"]
        train.update(grads=_records(train["grads"]), params=_records(train["params"]))
        raw["train"] = TrainStep(**train)
    return Observation(**raw)


def _records(raw: dict) -> dict[str, TensorRecord]:
    return {k: TensorRecord(**v) for k, v in raw.items()}


def write_reload(reload: Reload, path: str) -> None:
    """Atomic, like `write`."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(dataclasses.asdict(reload), tmp)
    os.replace(tmp, path)


def read_reload(path: str) -> Reload:
    raw = torch.load(path, weights_only=False)
    return Reload(
        saved=_records(raw["saved"]),
        state_dict=_records(raw["state_dict"]),
        failure=Failure(**raw["failure"]) if raw["failure"] is not None else None,
    )


def stack_versions() -> dict[str, str]:
    """Installed versions of torch, transformers and accelerate ("absent" if not installed), a fresh dict."""
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> dict[str, str]:
    # once per process: importlib.metadata scans every installed distribution (~10 ms, paid per case before)
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out
