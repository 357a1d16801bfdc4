"""State dicts and saved checkpoints as records, the same way on ranks, in the reference and in the reload.

A state dict is recorded key by key with `observe.record` (dtype, shape,
sha256 digest; values only up to 1 MiB), so the state-dict check compares
what a rank gathered, what it saved and what a plain load reads back with
the plain single-process load, bit for bit, without keeping a second model
in any result file.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from fsdp_load_checks.observe import record, record_gathered
from fsdp_load_checks.records import TensorKind, TensorRecord


def kinds_of(model: torch.nn.Module) -> dict[str, TensorKind]:
    """State-dict key -> PARAMETER or BUFFER (persistent buffers are the only buffers a state dict holds)."""
    return {name: TensorKind.PARAMETER for name, _ in model.named_parameters(remove_duplicate=False)}


def records(state_dict: dict[str, torch.Tensor], kinds: dict[str, TensorKind]) -> dict[str, TensorRecord]:
    """Every entry of a (full, CPU) state dict, in its order; a key `kinds` does not know is a buffer."""
    return {name: record(name, kinds.get(name, TensorKind.BUFFER), t) for name, t in state_dict.items()}


def gathered_records(model: torch.nn.Module, before_gather: Callable[[], None] | None = None,
                     keep: bool = True) -> dict[str, TensorRecord]:
    """`records(accelerator.get_state_dict(model), kinds_of(model))` of an FSDP2 model, a tensor at a time.

    accelerate 1.15's `get_state_dict` is torch's `get_model_state_dict(full_state_dict=True, cpu_offload=True)`:
    the entries of `model.state_dict()`, each DTensor gathered whole with a collective of its own, the whole dict
    then held by rank 0. Here the same entries, gathered and recorded one tensor (or one 1 MiB group of small
    shards) at a time by observe.record_gathered, bit-equal to `full_tensor()`. One difference: an entry left on
    meta is recorded as such (observe.record), where torch 2.13 raises on rank 0 (NotImplementedError: Cannot
    copy out of meta tensor) and its peers go on. A collective: every rank calls it; a rank with `keep=False`
    takes part and records nothing.
    """
    kinds = kinds_of(model)
    return record_gathered(list(model.state_dict().items()), lambda name: kinds.get(name, TensorKind.BUFFER),
                           before_gather, keep)


def saved_records(directory: str | Path, kinds: dict[str, TensorKind]) -> dict[str, TensorRecord]:
    """The tensors `save_pretrained` wrote to `directory`'s *.safetensors files, as stored (key, dtype, bytes).

    Read one tensor at a time from the memory-mapped file, so a big checkpoint
    costs one tensor of memory. FileNotFoundError: no safetensors file there.
    """
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {directory}")
    out: dict[str, TensorRecord] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                out[name] = record(name, kinds.get(name, TensorKind.BUFFER), handle.get_tensor(name))
    return dict(sorted(out.items()))


def plain_save_records(model: torch.nn.Module) -> dict[str, TensorRecord]:
    """What `model.save_pretrained` (safetensors) writes for a plain, unsharded model: transformers' own
    convention (tied parameters stored once, non-persistent buffers left out), read back as records."""
    with tempfile.TemporaryDirectory(prefix="fsdp-load-checks-save-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        return saved_records(tmp, kinds_of(model))
