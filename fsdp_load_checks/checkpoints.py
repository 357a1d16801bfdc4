"""Checkpoints on disk, built from a case's config and seed; never downloaded.

Built once per run directory and shared by every pytest-xdist worker and
every loader: a file lock per case, and a marker written last, so a reader
never sees half a checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from filelock import FileLock

from fsdp_load_checks.cases import Case, import_all

DONE = "BUILT"


def checkpoint_dir(root: Path, case: Case) -> Path:
    return root / "checkpoints" / case.name


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
    """The case's checkpoint directory, built if this run has not built it yet."""
    from transformers import AutoModelForCausalLM

    out = checkpoint_dir(root, case)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / DONE).exists():
            return out
        import_all(case.imports)
        torch.manual_seed(case.seed)
        generator = torch.Generator().manual_seed(case.seed + 1)
        model = AutoModelForCausalLM.from_config(case.config())
        perturb_persistent_buffers(model, generator)
        model = model.to(getattr(torch, case.dtype))
        model.save_pretrained(out, safe_serialization=True)
        if case.drop_keys or case.extra_keys:
            edit_safetensors(out, case, generator)
        (out / DONE).write_text(case.name)
        return out


def model_bytes(path: Path) -> int:
    return sum(os.path.getsize(f) for f in Path(path).glob("*.safetensors"))
