"""How a rank turns a checkpoint into an FSDP2 model: the thing under test.

A loader is a context manager entered inside each rank around
`from_pretrained` and FSDP2 preparation, so patches never leak into the
parent or the reference. `stock` patches nothing: it is what a fork's CI
runs against its own transformers/accelerate.

`reference` is the smallest patch set we know that makes the stock stack
(transformers 5.23+, accelerate 1.10+) pass every check; docs/reference-loader.md
walks through it for a fork maintainer. It relies on T1, which is the
installed transformers, and changes four things (T2, T3, A1, A2), each
separately switchable so `regressions.py` can re-create each historical
bug as "the reference, except this piece", showing only its own symptom:

  T1  ranks 1..N: parameters and persistent buffers stay as loaded (memory-mapped,
      no page touched); only non-persistent buffers get placeholders, which
      `_init_weights` recomputes. This is transformers 5.23+ as installed.
  T2  the loading rank: non-persistent buffers start from the value the model's
      `__init__` gives them instead of `torch.empty_like`, so one `_init_weights`
      forgets is right on rank 0 (and in any plain load).
  T3  every rank: a buffer tensor registered under several names is materialised
      once and set under every name (transformers and accelerate both dedupe
      buffers by identity and leave the other names on meta).
  A1  accelerate `fsdp2_load_full_state_dict`: a state-dict entry that is a plain
      tensor (a persistent buffer) is broadcast from rank 0 and kept whole,
      instead of reading `.device_mesh` from it (accelerate issue 3898).
  A2  accelerate `fsdp2_prepare_model`: after preparation every rank takes rank 0's
      non-persistent buffers (broadcast) instead of re-registering its own copy.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import ContextManager

from fsdp_load_checks import regressions


@dataclass(frozen=True)
class Loader:
    name: str
    summary: str
    patch: Callable[[], ContextManager]


# ---------------------------------------------------------------------------
# The reference patch set, parameterised so a regression can swap one piece.
# Nothing here imports transformers/accelerate at module level: ranks import
# this module before they need either.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """Which pieces of the reference patch set a loader uses (defaults: all of them)."""

    # transformers `_move_missing_keys_from_meta_to_device`, ranks 1..N of a node: None keeps the
    # installed branch (T1); a regression passes its era's branch, a function of the model.
    non_rank0_branch: Callable | None = None
    # transformers `_initialize_missing_keys`, ranks 1..N: run `initialize_weights()` so `_init_weights`
    # recomputes the non-persistent buffers (installed behaviour)
    recompute_non_persistent: bool = True
    init_values: bool = True  # T2
    share_buffers: bool = True  # T3
    # A1: "broadcast" (reference) or "rank-local" (each rank keeps its own copy, no broadcast)
    persistent_buffers: str = "broadcast"
    broadcast_non_persistent: bool = True  # A2


REFERENCE = Variant()


def _swap(target, name: str, value) -> Callable[[], None]:
    old = getattr(target, name)
    setattr(target, name, value)
    return lambda: setattr(target, name, old)


@contextlib.contextmanager
def patched(variant: Variant) -> Iterator[None]:
    """Install `variant` into transformers and accelerate for the duration."""
    import accelerate.accelerator
    import accelerate.utils
    from accelerate.utils import fsdp_utils
    from transformers import modeling_utils

    model_cls = modeling_utils.PreTrainedModel
    prepare = _prepare_model(variant, fsdp_utils.fsdp2_prepare_model)
    undo = [
        _swap(model_cls, "_move_missing_keys_from_meta_to_device", _move_missing_keys(variant, model_cls._move_missing_keys_from_meta_to_device)),
        _swap(model_cls, "_initialize_missing_keys", _initialize_missing_keys(variant, model_cls._initialize_missing_keys)),
        _swap(fsdp_utils, "fsdp2_load_full_state_dict", _load_full_state_dict(variant)),
        # the CPU path calls fsdp_utils.fsdp2_prepare_model; Accelerator.prepare its own import of it
        _swap(fsdp_utils, "fsdp2_prepare_model", prepare),
        _swap(accelerate.utils, "fsdp2_prepare_model", prepare),
        _swap(accelerate.accelerator, "fsdp2_prepare_model", prepare),
    ]
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()


def _non_loading_rank() -> bool:
    """transformers' own test for ranks 1..N of a node under cpu_ram_efficient_loading."""
    from transformers import modeling_utils

    return modeling_utils.is_fsdp_enabled() and not modeling_utils.is_local_dist_rank_0()


# --- transformers: PreTrainedModel._move_missing_keys_from_meta_to_device (T1, T2, T3) ---


def _move_missing_keys(variant: Variant, installed):
    def _move_missing_keys_from_meta_to_device(self, missing_keys, device_map, device_mesh, hf_quantizer):
        from transformers import modeling_utils

        if modeling_utils.is_deepspeed_zero3_enabled() and hf_quantizer is None:
            return installed(self, missing_keys, device_map, device_mesh, hf_quantizer)
        shared = shared_buffer_names(self) if variant.share_buffers else []
        non_loading = _non_loading_rank() and hf_quantizer is None
        _log_branch(self, non_loading)
        if non_loading and variant.non_rank0_branch is not None:
            variant.non_rank0_branch(self)  # a regression's era
        else:
            installed(self, missing_keys, device_map, device_mesh, hf_quantizer)  # T1 on ranks 1..N
        for names in shared:  # T3
            share_buffer(self, names)
        if variant.init_values and not non_loading:  # T2
            copy_init_values(self)

    return _move_missing_keys_from_meta_to_device


BRANCH_LOG = "fsdp-load-checks loader:"


def _log_branch(model, non_loading: bool) -> None:
    """One line in the rank's log saying which transformers branch this load took.

    A rank other than LOCAL_RANK 0 that did not take the non-loading-rank
    branch is not exercising cpu_ram_efficient_loading at all (the env
    flags were lost), and every verdict on it says nothing about the loader.
    """
    import os
    import sys

    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank in (None, "0"):
        return
    where = getattr(model.config, "_name_or_path", "") or type(model).__name__
    if non_loading:
        sys.stderr.write(f"{BRANCH_LOG} {where}: non-loading-rank branch (LOCAL_RANK {local_rank})\n")
    else:
        flags = {k: os.environ.get(k) for k in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")}
        sys.stderr.write(f"{BRANCH_LOG} {where}: loading-rank branch on LOCAL_RANK {local_rank}, env {flags}\n")
    sys.stderr.flush()


def shared_buffer_names(model) -> list[list[str]]:
    """Names of each buffer tensor registered under more than one name, in registration order."""
    by_tensor: dict[int, list[str]] = {}
    for name, buf in model.named_buffers(remove_duplicate=False):
        by_tensor.setdefault(id(buf), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def _set_buffer(model, name: str, value) -> None:
    owner, _, attr = name.rpartition(".")
    model.get_submodule(owner)._buffers[attr] = value


def share_buffer(model, names: list[str]) -> None:
    """Put the one materialised tensor of a shared buffer back under all of its names."""
    tensors = [model.get_buffer(n) for n in names]
    real = next((t for t in tensors if t.device.type != "meta"), None)
    if real is not None:
        for name in names:
            _set_buffer(model, name, real)


def init_values(model) -> dict:
    """Non-persistent buffers as the model's `__init__` computes them.

    transformers builds the model on meta, so those values are gone by the
    time it loads; a second construction with parameters on meta and
    buffers real gets them back (the same construction the suite's
    reference uses, so the values are bit-identical).
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        skeleton = type(model)._from_config(copy.deepcopy(model.config), dtype=model.config.dtype)
    return {
        name: buf
        for name, buf in skeleton.named_buffers(remove_duplicate=False)
        if name in non_persistent_names(skeleton) and buf.device.type != "meta"
    }


def non_persistent_names(model) -> set[str]:
    names = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        names.update(prefix + b for b in module._non_persistent_buffers_set)
    return names


def copy_init_values(model) -> None:
    """T2: fill the loading rank's non-persistent placeholders with their `__init__` values.

    In place, before `_init_weights` runs: buffers it knows it still
    recomputes; one it forgets keeps its `__init__` value instead of
    `torch.empty_like` garbage.
    """
    import torch

    wanted = init_values(model)
    with torch.no_grad():
        for name, buf in model.named_buffers(remove_duplicate=False):
            value = wanted.get(name)
            if value is None or buf.device.type == "meta" or buf.shape != value.shape:
                continue
            buf.copy_(value)


# --- transformers: PreTrainedModel._initialize_missing_keys ---


def _initialize_missing_keys(variant: Variant, installed):
    def _initialize_missing_keys(self, is_quantized):
        if not variant.recompute_non_persistent and _non_loading_rank():
            return None  # a regression: ranks 1..N skip initialize_weights() altogether
        return installed(self, is_quantized)

    return _initialize_missing_keys


# --- accelerate: fsdp2_load_full_state_dict (A1) ---


def _load_full_state_dict(variant: Variant):
    def fsdp2_load_full_state_dict(accelerator, model, full_sd: dict, cpu_offload: bool = False):
        """accelerate 1.15.0's function, plus one branch for state-dict entries that are plain tensors.

        Parameters (DTensors after `fully_shard`) go exactly as upstream: rank 0
        broadcasts the full tensor, every rank keeps its shard. A persistent
        buffer is a plain tensor with no `device_mesh`: rank 0 broadcasts it and
        every rank keeps it whole (A1). Upstream reads `.device_mesh` from every
        entry and raises AttributeError on the first buffer (issue 3898).
        """
        import torch
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, distribute_tensor

        meta_sharded_sd = model.state_dict()
        sharded_sd = {}

        def _infer_parameter_dtype(model, param_name, empty_param):
            try:
                old_param = model.get_parameter_or_buffer(param_name)
            except AttributeError:
                base_param_name, local_param_name = param_name.rsplit(".", 1)
                submodule = model.get_submodule(base_param_name)
                old_param = getattr(submodule, local_param_name)
            is_torch_e4m3fn_available = hasattr(torch, "float8_e4m3fn")
            casting_dtype = None
            is_param_float8_e4m3fn = is_torch_e4m3fn_available and empty_param.dtype == torch.float8_e4m3fn
            if empty_param.dtype.is_floating_point and not is_param_float8_e4m3fn:
                casting_dtype = old_param.dtype
            return old_param is not None and old_param.is_contiguous(), casting_dtype

        def _cast_and_contiguous(tensor, to_contiguous, dtype):
            if dtype is not None:
                tensor = tensor.to(dtype=dtype)
            if to_contiguous:
                tensor = tensor.contiguous()
            return tensor

        def _finish(param_name, tensor, full):
            to_contiguous, casting_dtype = _infer_parameter_dtype(model, param_name, full)
            tensor = _cast_and_contiguous(tensor, to_contiguous, casting_dtype)
            if cpu_offload:
                tensor = tensor.to("cpu")
            sharded_sd[param_name] = tensor

        if accelerator.is_main_process:
            for param_name, sharded_param in meta_sharded_sd.items():
                if param_name not in full_sd:
                    raise KeyError(
                        f"Parameter '{param_name}' found in sharded model state dict but missing from full state dict. "
                        f"Full state dict has {len(full_sd)} keys, sharded has {len(meta_sharded_sd)} keys."
                    )
                full_param = full_sd[param_name]
                if not isinstance(sharded_param, DTensor):  # a persistent buffer
                    full_param = full_param.detach().to(accelerator.device)
                    if variant.persistent_buffers == "broadcast":
                        dist.broadcast(full_param, src=0, group=dist.group.WORLD)
                    _finish(param_name, full_param, full_param)
                    continue
                device_mesh = sharded_param.device_mesh
                full_param = full_param.detach().to(device_mesh.device_type)
                if isinstance(full_param, DTensor):
                    full_param = full_param.to_local()
                dist.broadcast(full_param, src=0, group=dist.group.WORLD)
                sharded_tensor = distribute_tensor(full_param, device_mesh, sharded_param.placements)
                _finish(param_name, sharded_tensor, full_param)
        else:
            for param_name, sharded_param in meta_sharded_sd.items():
                if not isinstance(sharded_param, DTensor):  # a persistent buffer
                    if variant.persistent_buffers == "broadcast":
                        full_tensor = torch.empty(sharded_param.size(), device=accelerator.device, dtype=sharded_param.dtype)
                        dist.broadcast(full_tensor, src=0, group=dist.group.WORLD)
                    else:  # a regression: this rank's own pre-preparation copy
                        full_tensor = full_sd[param_name].detach().to(accelerator.device)
                    _finish(param_name, full_tensor, full_tensor)
                    continue
                device_mesh = sharded_param.device_mesh
                full_tensor = torch.empty(sharded_param.size(), device=device_mesh.device_type, dtype=sharded_param.dtype)
                dist.broadcast(full_tensor, src=0, group=dist.group.WORLD)
                sharded_tensor = distribute_tensor(full_tensor, device_mesh, sharded_param.placements)
                _finish(param_name, sharded_tensor, full_tensor)

        model.load_state_dict(sharded_sd, assign=True)
        return model

    return fsdp2_load_full_state_dict


# --- accelerate: fsdp2_prepare_model (A2, T3) ---


def _prepare_model(variant: Variant, installed):
    def fsdp2_prepare_model(accelerator, model):
        """accelerate's own preparation, then every non-persistent buffer fixed up under all its names.

        Upstream deep-copies each rank's non-persistent buffers (one name per
        tensor), moves the model to meta and re-registers those copies. A2:
        every rank then takes rank 0's value instead. T3: a buffer shared by
        several modules goes back under every name (`model.to("meta")`
        splits the sharing, and only the first name was saved).
        """
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule) or not accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
            return installed(accelerator, model)
        names = non_persistent_names(model)
        groups: dict[int, list[str]] = {}
        for name, buf in model.named_buffers(remove_duplicate=False):
            if name in names:
                groups.setdefault(id(buf), []).append(name)
        model = installed(accelerator, model)
        shared = [g if variant.share_buffers else g[:1] for g in groups.values()]
        if variant.broadcast_non_persistent:
            broadcast_non_persistent(accelerator, model, shared)
        else:  # each rank keeps the copy accelerate re-registered under the first name
            for group in shared:
                value = model.get_buffer(group[0])
                for name in group[1:]:
                    _set_buffer(model, name, value)
        return model

    return fsdp2_prepare_model


def broadcast_non_persistent(accelerator, model, groups: list[list[str]]) -> None:
    """A2: every rank ends with rank 0's non-persistent buffers: same values, same dtype, shared as on rank 0."""
    import torch
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    # shapes and dtypes from rank 0, so a rank that got them wrong (a cast, a placeholder) cannot desynchronise
    meta = [[(g, tuple(t.shape), t.dtype) for g in groups for t in [model.get_buffer(g[0])]]] if rank0 else [None]
    dist.broadcast_object_list(meta, src=0)
    for group, shape, dtype in meta[0]:
        if rank0:
            value = model.get_buffer(group[0]).detach().to(accelerator.device).contiguous()
        else:
            value = torch.empty(shape, dtype=dtype, device=accelerator.device)
        if value.numel():
            raw = value.view(-1).view(torch.uint8)  # bytes: gloo has no bool, and dtypes need not match
            dist.broadcast(raw, src=0)
        for name in group:
            _set_buffer(model, name, value)


# ---------------------------------------------------------------------------


def _variant_loader(name: str, summary: str, variant: Variant) -> Loader:
    return Loader(name, summary, lambda: patched(variant))


LOADERS: dict[str, Loader] = {
    "stock": Loader("stock", "the installed transformers and accelerate, untouched", contextlib.nullcontext),
    "reference": _variant_loader(
        "reference",
        "stock + the documented fix set (docs/reference-loader.md): persistent buffers broadcast (accelerate #3898), "
        "rank 0's non-persistent buffers broadcast, __init__ values for buffers _init_weights forgets, shared buffers kept",
        REFERENCE,
    ),
}
for _r in regressions.REGRESSIONS:
    LOADERS[_r.name] = _variant_loader(_r.name, _r.summary, replace(REFERENCE, **_r.changes))


def get(name: str) -> Loader:
    try:
        return LOADERS[name]
    except KeyError:
        raise KeyError(f"unknown loader {name!r}; choose one of: {', '.join(LOADERS)}") from None
