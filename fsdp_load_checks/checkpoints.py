"""Checkpoints on disk, built from a case's config and seed (in the reference process); never downloaded.

Built once per run directory and shared by every pytest-xdist worker and
every loader: a file lock per case, and a marker written last, so a reader
never sees half a checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from filelock import FileLock

from fsdp_load_checks import model_class
from fsdp_load_checks.catalogue import import_all
from fsdp_load_checks.records import Case

DONE = "BUILT"


def checkpoint_dir(root: Path, case: Case) -> Path:
    return Path(case.checkpoint) if case.checkpoint else root / "checkpoints" / case.checkpoint_name


def perturb_persistent_buffers(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every persistent buffer a value its init would not produce.

    Otherwise a rank that re-initialises a buffer instead of receiving it
    (DeepSeek-V3's router bias inits to zeros) would look correct.
    """
    keys = set(model.state_dict())
    for name, buf in model.named_buffers():
        if name not in keys or buf.numel() == 0:
            continue
        with torch.no_grad():
            if buf.is_floating_point():
                noise = torch.rand(buf.shape, generator=generator) * 0.5 + 0.25
                buf.add_(noise.to(buf.dtype))
            elif buf.dtype != torch.bool:
                perm = torch.randperm(buf.numel(), generator=generator)
                buf.copy_(buf.flatten()[perm].view_as(buf))


def edit_safetensors(path: Path, case: Case, generator: torch.Generator) -> None:
    from safetensors.torch import load_file, save_file

    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one safetensors file in {path}, found {len(files)}")
    tensors = load_file(files[0])
    for key in case.drop_keys:
        if key not in tensors:
            raise KeyError(f"case {case.name}: cannot drop {key!r}, not in checkpoint")
        del tensors[key]
    for key in case.extra_keys:
        tensors[key] = torch.randn(4, 4, generator=generator)
    save_file(tensors, str(files[0]), metadata={"format": "pt"})


def build(root: Path, case: Case) -> Path:
    """The case's checkpoint directory, built if this run has not built it yet, from `case.checkpoint_class`
    (when set) or `case.model_class`."""
    out = checkpoint_dir(root, case)
    if case.checkpoint:  # the user's own checkpoint: read, never written
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / DONE).exists():
            return out
        import_all(case.imports)
        torch.manual_seed(case.seed)
        generator = torch.Generator().manual_seed(case.seed + 1)
        model = model_class.from_config(case.checkpoint_class or case.model_class, case.config())
        perturb_persistent_buffers(model, generator)
        model = model.to(getattr(torch, case.dtype))
        model.save_pretrained(out, safe_serialization=True)
        if case.drop_keys or case.extra_keys:
            edit_safetensors(out, case, generator)
        (out / DONE).write_text(case.name)
        return out


def model_bytes(path: Path) -> int:
    return sum(os.path.getsize(f) for f in Path(path).glob("*.safetensors"))


class BadCheckpoint(ValueError):
    """A user's checkpoint directory that cannot be loaded; the message is one line with the fix."""


def validate(path: str) -> tuple[Path, str]:
    """Check a user's checkpoint directory before any rank starts; return it and its dtype.

    Every problem here would otherwise surface as N identical tracebacks,
    one per rank, after torch and transformers have been imported N times.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise BadCheckpoint(f"checkpoint path {path} does not exist; pass a directory written by save_pretrained")
    if not p.is_dir():
        raise BadCheckpoint(f"{path} is a file, not a checkpoint directory; pass the directory holding config.json")
    if not os.access(p, os.R_OK | os.X_OK):
        raise BadCheckpoint(f"checkpoint directory {path} is not readable; fix its permissions")
    config_file = p / "config.json"
    if not config_file.is_file():
        raise BadCheckpoint(f"{path} is not a checkpoint directory: no config.json (write one with model.save_pretrained)")
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        raise BadCheckpoint(f"{path} has no *.safetensors files; save the model with save_pretrained(safe_serialization=True)")
    from safetensors import SafetensorError, safe_open

    for f in weights:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            raise BadCheckpoint(f"{f} is not a readable safetensors file ({str(exc).splitlines()[0]}); re-save the checkpoint") from None
    import json

    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise BadCheckpoint(f"{config_file} is not valid JSON ({exc}); re-save the checkpoint") from None
    try:  # the class it loads with is model_class.named_in's business; here only the config must be known
        config = model_class.read_config(p)
    except (ValueError, KeyError, OSError) as exc:
        import transformers

        kind = raw.get("model_type", "?")
        raise BadCheckpoint(
            f"{path}: model type {kind!r} is not known to transformers {transformers.__version__} "
            f"({type(exc).__name__}); install a transformers that has it, or pass --import MODULE that registers it"
        ) from None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return p.resolve(), str(dtype).removeprefix("torch.")
