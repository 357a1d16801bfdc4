"""The fixed loader: the smallest patch set we know that makes the stock stack pass every check.

For transformers 5.23+ and accelerate 1.10+; docs/fixed-loader.md walks
through it for a fork maintainer. It relies on T1, which is the installed
transformers, and changes eight things (T2, T3, T4, T5, A1, A2, A4, A5), each separately
switchable (`Variant`) so `regressions.py` can re-create each historical bug
as "the fixed loader, except this piece", showing only its own symptom
(A3 applies under a mixed-precision accelerate config only). The patches
stay installed after preparation too (rank/case.py), since A4 acts when the
prepared model is saved:

  T1  ranks 1..N: parameters and persistent buffers stay as loaded (memory-mapped,
      no page touched); only non-persistent buffers get placeholders, which
      `_init_weights` recomputes. This is transformers 5.23+ as installed.
  T2  the loading rank: non-persistent buffers start from the value the model's
      `__init__` gives them instead of `torch.empty_like`, so one `_init_weights`
      forgets is right on rank 0 (and in any plain load).
  T4  ranks 1..N: parameters the checkpoint lacks get their own uncommitted storage
      instead of staying on meta, where they all share `data_ptr() == 0` and collide
      in accelerate's optimizer mapping (`give_missing_parameters_storage`).
  T5  ranks 1..N: checkpoint-to-model conversions (MoE experts stacked into 3-D parameters)
      run on meta, for their shapes, and each result gets uncommitted storage, instead of a
      converted copy of weights the broadcast replaces (`uncommitted_like`).
  T3  every rank: a buffer tensor registered under several names is materialised
      once and set under every name (transformers and accelerate both dedupe
      buffers by identity and leave the other names on meta).
  A1  accelerate `fsdp2_load_full_state_dict`: persistent buffers (plain tensors in
      the state dict, no `device_mesh`) are kept out of the installed function,
      which loads the parameters exactly as upstream; rank 0 then broadcasts each
      buffer and every rank keeps it whole (accelerate issue 3898).
  A2  accelerate `fsdp2_prepare_model`: after preparation every rank takes rank 0's
      non-persistent buffers (broadcast) instead of re-registering its own copy.
  A3  accelerate `fsdp2_prepare_model` under mixed precision (1.14+): ranks 1..N get
      uncommitted fp32 placeholders for the parameters it upcasts, instead of an fp32
      copy of weights the broadcast replaces (`upcast_placeholders`).
  A5  accelerate `fsdp2_prepare_model` (1.14+): every module that holds a parameter of the
      tail group it carves (input and output embeddings, final norm) joins that group, so a
      parameter tied beyond the embeddings (T5's `embed_tokens`, BERT-MLM's decoder bias) is in
      one FSDP group only (`tied_holders`).
  A4  accelerate `Accelerator.get_state_dict` under FSDP2: one tensor per parameter (tied
      names share it, as `nn.Module.state_dict()` does, so `save_pretrained` stores the tie
      once) in the dtype the model was loaded in (not the fp32 master copy mixed precision
      upcast it to), so a saved checkpoint is what a plain load would save (`as_loaded`).

Until this module was split out it was the `reference` loader; `reference`
stays an alias of `fixed` for one release (loaders/__init__.py).
Nothing here imports transformers or accelerate at module level: ranks import
this module before they need either.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fsdp_load_checks.tensors import (
    init_non_persistent,
    non_persistent_groups,
    persistent_buffer_names,
    set_tensor,
    share_buffer,
    shared_buffer_names,
)


@dataclass(frozen=True)
class Variant:
    """Which pieces of the fixed patch set a loader uses (defaults: all of them)."""

    # transformers `_move_missing_keys_from_meta_to_device`, ranks 1..N of a node: None keeps the
    # installed branch (T1); a regression passes its era's branch, a function of the model.
    non_rank0_branch: Callable | None = None
    # transformers `_initialize_missing_keys`, ranks 1..N: run `initialize_weights()` so `_init_weights`
    # recomputes the non-persistent buffers (installed behaviour)
    recompute_non_persistent: bool = True
    init_values: bool = True  # T2
    share_buffers: bool = True  # T3
    # A1: "broadcast" (fixed) or "rank-local" (each rank keeps its own copy, no broadcast)
    persistent_buffers: str = "broadcast"
    broadcast_non_persistent: bool = True  # A2
    # A3, under mixed precision: ranks 1..N upcast "placeholder" (uncommitted fp32 torch.empty, fixed) or
    # "copy" (param.data.to(float32) of the loaded weights, accelerate 1.14+ as installed)
    receiving_upcast: str = "placeholder"
    # under mixed precision, accelerate 1.14+ upcasts trainable parameters to fp32 master weights; False
    # re-creates accelerate <= 1.13, where the upcast was a no-op and master weights stayed half precision
    fp32_master_weights: bool = True
    state_dict_as_loaded: bool = True  # A4
    # accelerate's fsdp2_prepare_model re-ties embedding and output head (tie_weights) after moving the model
    # to meta and after loading; False: neither call ties, so FSDP2 shards the tie as two parameters
    retie: bool = True
    # accelerate re-registers each rank's non-persistent buffers with persistent=False; False: with
    # register_buffer's default (persistent), so they enter every state dict
    non_persistent_stay_non_persistent: bool = True
    # A5: every module holding a parameter of accelerate's tail group (embeddings, output head) joins that group
    group_ties: bool = True
    # T5: ranks 1..N run checkpoint conversions (MoE experts stacked) on meta and keep uncommitted results
    convert_shapes_only: bool = True


FIXED = Variant()


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
        _swap(fsdp_utils, "fsdp2_load_full_state_dict", _load_full_state_dict(variant, fsdp_utils.fsdp2_load_full_state_dict)),
        # the CPU path calls fsdp_utils.fsdp2_prepare_model; Accelerator.prepare its own import of it
        _swap(fsdp_utils, "fsdp2_prepare_model", prepare),
        _swap(accelerate.utils, "fsdp2_prepare_model", prepare),
        _swap(accelerate.accelerator, "fsdp2_prepare_model", prepare),
        _swap(accelerate.accelerator.Accelerator, "get_state_dict",
              _get_state_dict(variant, accelerate.accelerator.Accelerator.get_state_dict)),
    ]
    converter = getattr(importlib.import_module("transformers.core_model_loading"), "WeightConverter", None)
    if variant.convert_shapes_only and converter is not None:  # T5 (the class exists from transformers 5.0)
        undo.append(_swap(converter, "convert", _convert(converter.convert)))
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()


def _non_loading_rank() -> bool:
    """transformers' own test for ranks 1..N of a node under cpu_ram_efficient_loading."""
    from transformers import modeling_utils

    return modeling_utils.is_fsdp_enabled() and not modeling_utils.is_local_dist_rank_0()


# --- transformers: WeightConverter.convert (T5) ---


def _convert(installed):
    def convert(self, layer_name, model=None, config=None, hf_quantizer=None, loading_info=None):
        """T5: on ranks 1..N a checkpoint-to-model conversion (MoE experts stacked into 3-D parameters, q/k/v
        fused) runs on meta, for its shapes only, and each result gets uncommitted storage: its values are never
        read (the broadcast replaces them), where the installed conversion commits a full copy of the converted
        weights on every rank (transformers issue 43749)."""
        if hf_quantizer is not None or not _non_loading_rank():
            return installed(self, layer_name, model, config, hf_quantizer, loading_info)
        with _materialized_on_meta(type(self)):
            converted = installed(self, layer_name, model, config, hf_quantizer, loading_info)
        return {name: uncommitted_like(t) for name, t in converted.items()}

    return convert


@contextlib.contextmanager
def _materialized_on_meta(converter_cls) -> Iterator[None]:
    """The converter's collected checkpoint tensors arrive as meta tensors (shape and dtype, no data)."""
    installed = converter_cls.materialize_tensors

    def materialize_tensors(self):
        return {key: [t.to("meta") for t in tensors] for key, tensors in installed(self).items()}

    converter_cls.materialize_tensors = materialize_tensors
    try:
        yield
    finally:
        converter_cls.materialize_tensors = installed


def uncommitted_like(tensor):
    """A meta tensor's CPU twin from `torch.empty` (no page touched, so no memory committed); others as they are."""
    import torch

    if not isinstance(tensor, torch.Tensor) or not tensor.is_meta:
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype)


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
        if non_loading:  # T4
            give_missing_parameters_storage(self, missing_keys)
        for names in shared:  # T3
            share_buffer(self, names)
        if variant.init_values and not non_loading:  # T2
            copy_init_values(self)

    return _move_missing_keys_from_meta_to_device


def give_missing_parameters_storage(model, missing_keys) -> None:
    """T4: ranks 1..N give each parameter the checkpoint lacks its own (uncommitted) storage.

    transformers 5.x returns early on ranks 1..N (`_move_missing_keys_from_meta_to_device` materialises only the
    non-persistent buffers), so parameters missing from the checkpoint stay on meta there, all with
    `data_ptr() == 0`; accelerate's `_prepare_fsdp2` maps optimizer parameters to the sharded ones by
    `data_ptr()` (accelerator.py `_get_named_parameters(drop_refs=True)`, `fsdp2_switch_optimizer_parameters`),
    so with two or more such parameters the mapping collides and a receiving rank's optimizer holds one of
    them twice and the others not at all. `torch.empty` commits no memory; rank 0's broadcast fills it.
    """
    import torch
    from transformers.modeling_utils import _load_parameter_into_model

    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for key in sorted(set(missing_keys) - tied):
        try:
            param = model.get_parameter(key)
        except AttributeError:  # a buffer: not in the optimizer
            continue
        if param.device.type == "meta":
            _load_parameter_into_model(model, key, torch.empty_like(param, device="cpu"))


BRANCH_LOG = "fsdp-load-checks loader:"
BRANCH_ATTR = "_fsdp_load_checks_branch"  # on the loaded model: which branch its from_pretrained took (rank/case.py)
NON_LOADING_BRANCH = "non-loading-rank"


def _log_branch(model, non_loading: bool) -> None:
    """Which transformers branch this load took: kept on the model (`BRANCH_ATTR`, read into the rank's
    observation) and one line in the rank's log.

    A rank other than LOCAL_RANK 0 that did not take the non-loading-rank
    branch is not exercising cpu_ram_efficient_loading at all (the env
    flags were lost), and every verdict on it says nothing about the loader.
    """
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank in (None, "0"):
        return
    setattr(model, BRANCH_ATTR, NON_LOADING_BRANCH if non_loading else "loading-rank")
    where = getattr(model.config, "_name_or_path", "") or type(model).__name__
    if non_loading:
        sys.stderr.write(f"{BRANCH_LOG} {where}: non-loading-rank branch (LOCAL_RANK {local_rank})\n")
    else:
        flags = {k: os.environ.get(k) for k in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")}
        sys.stderr.write(f"{BRANCH_LOG} {where}: loading-rank branch on LOCAL_RANK {local_rank}, env {flags}\n")
    sys.stderr.flush()


def copy_init_values(model) -> None:
    """T2: fill the loading rank's non-persistent placeholders with their `__init__` values.

    In place, before `_init_weights` runs: buffers it knows it still
    recomputes; one it forgets keeps its `__init__` value instead of
    `torch.empty_like` garbage.
    """
    import torch

    wanted = init_non_persistent(type(model), model.config, model.config.dtype)
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


def _load_full_state_dict(variant: Variant, installed):
    def fsdp2_load_full_state_dict(accelerator, model, full_sd: dict, cpu_offload: bool = False):
        """The installed function for the parameters; persistent buffers broadcast from rank 0 around it (A1).

        The installed function reads `.device_mesh` from every state-dict
        entry and raises AttributeError on the first buffer (issue 3898). The
        buffers are marked non-persistent for the duration of the call, so
        neither its `state_dict()` nor its strict `load_state_dict` sees them;
        then, in state-dict order, rank 0 broadcasts each (in the dtype the
        prepared model holds it in) and every rank keeps it whole.
        """
        import torch
        import torch.distributed as dist

        buffers = persistent_buffer_names(model)
        owners = [(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]) for name in buffers]
        for module, attr in owners:
            module._non_persistent_buffers_set.add(attr)
        try:
            model = installed(accelerator, model, full_sd, cpu_offload)
        finally:
            for module, attr in owners:
                module._non_persistent_buffers_set.discard(attr)
        for name in buffers:
            meta = model.get_buffer(name)
            dtype = meta.dtype if meta.is_floating_point() else None
            if accelerator.is_main_process or variant.persistent_buffers != "broadcast":
                # rank 0's own copy; a regression ("rank-local"): every rank's own pre-preparation copy
                value = full_sd[name].detach().to(accelerator.device)
                value = value.to(dtype) if dtype is not None else value
                value = value.contiguous()
            else:
                value = torch.empty(meta.shape, device=accelerator.device, dtype=meta.dtype)
            if variant.persistent_buffers == "broadcast":
                dist.broadcast(value, src=0, group=dist.group.WORLD)
            set_tensor(model, name, value.to("cpu") if cpu_offload else value)
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

        if isinstance(model, FSDPModule):
            return installed(accelerator, model)
        if not accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
            with _tied_holders_grouped(model) if variant.group_ties else contextlib.nullcontext():
                return installed(accelerator, model)
        groups = non_persistent_groups(model)  # before accelerate's model.to("meta") splits shared ones
        dtypes = loaded_dtypes(model)  # A4: before the mixed-precision upcast
        mixed = accelerator.mixed_precision != "no"
        with contextlib.ExitStack() as stack:
            if variant.group_ties:
                stack.enter_context(_tied_holders_grouped(model))  # A5
            if not variant.retie:
                stack.enter_context(_ties_skipped(model))
            if mixed and not variant.fp32_master_weights:
                stack.enter_context(_mixed_precision_hidden(accelerator))  # accelerate <= 1.13: no upcast, the policy alone
            elif mixed and variant.receiving_upcast == "placeholder" and _non_loading_rank():
                upcast_placeholders(model)  # A3
            model = installed(accelerator, model)
        shared = [g if variant.share_buffers else g[:1] for g in groups]
        if variant.broadcast_non_persistent:
            broadcast_non_persistent(accelerator, model, shared)
        else:  # each rank keeps the copy accelerate re-registered under the first name
            for group in shared:
                value = model.get_buffer(group[0])
                for name in group[1:]:
                    set_tensor(model, name, value)
        if not variant.non_persistent_stay_non_persistent:
            for group in shared:  # register_buffer's default: persistent
                for name in group:
                    owner, _, attr = name.rpartition(".")
                    module = model.get_submodule(owner)
                    module.register_buffer(attr, module._buffers[attr])
        LOADED_DTYPES[model] = dtypes
        return model

    return fsdp2_prepare_model


def tied_holders(model, modules: list) -> list:
    """`modules` (one FSDP group) and every other module of `model` that directly holds one of their parameters,
    with any module whose ancestor is in the list dropped (the ancestor's group covers it). A5.

    Raises nothing; a holder already sharded in a group of its own is left out (its tie stays split)."""
    from torch.distributed.fsdp import FSDPModule

    params = {id(p) for m in modules for p in m.parameters()}
    group = list(modules)
    for holder in model.modules():
        if holder is model or isinstance(holder, FSDPModule) or any(holder is m for m in group):
            continue
        if any(id(p) in params for p in holder.parameters(recurse=False)):
            group.append(holder)
    return [m for m in group if not any(a is not m and any(m is d for d in a.modules()) for a in group)]


@contextlib.contextmanager
def _tied_holders_grouped(model) -> Iterator[None]:
    """A5: accelerate (1.14+) carves a tail group `fully_shard([final_norm, input_embed, output_embed])`; every
    other module holding one of its parameters joins that group (`tied_holders`), so no parameter is visible to
    two FSDP groups, which torch 2.13 refuses at the first forward: T5's encoder and decoder `embed_tokens` share
    `shared.weight`; BertForMaskedLM's decoder bias is `cls.predictions.bias`.

    accelerate imports `fully_shard` from `torch.distributed.fsdp` when `fsdp2_prepare_model` runs, so the
    module attribute is swapped for the duration."""
    import torch.distributed.fsdp as fsdp

    installed = fsdp.fully_shard

    def fully_shard(module, *args, **kwargs):
        if isinstance(module, (list, tuple)):
            module = tied_holders(model, list(module))
        return installed(module, *args, **kwargs)

    fsdp.fully_shard = fully_shard
    try:
        yield
    finally:
        fsdp.fully_shard = installed


@contextlib.contextmanager
def _ties_skipped(model) -> Iterator[None]:
    """`model.tie_weights()` does nothing for the duration (a regression: the tie lost on meta stays lost)."""
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights


def upcast_placeholders(model) -> None:
    """A3: on a rank that only receives, the fp32 master weights start as uncommitted `torch.empty`.

    accelerate 1.14+ upcasts each trainable non-fp32 parameter with
    `param.data.to(torch.float32)` on every rank before `model.to("meta")`;
    on ranks 1..N that copies memory-mapped weights the broadcast replaces,
    committing an fp32 model per rank. With fp32 placeholders of the same
    shape the installed upcast finds nothing to do, the state dict it
    captures has the right dtypes, and no page is touched. Rank 0 keeps the
    real upcast: it broadcasts from it.
    """
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32 and param.is_floating_point():
            param.data = torch.empty(param.shape, dtype=torch.float32, device=param.device)


@contextlib.contextmanager
def _mixed_precision_hidden(accelerator) -> Iterator[None]:
    """`accelerator.mixed_precision` reads "no" for the duration (the upcast's condition); the plugin's policy stays."""
    state = accelerator.state
    saved = state._mixed_precision
    state._mixed_precision = "no"
    try:
        yield
    finally:
        state._mixed_precision = saved


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
            set_tensor(model, name, value)


# --- accelerate: Accelerator.get_state_dict (A4) ---

# prepared model -> parameter name -> the dtype it had before fsdp2_prepare_model (the one it was loaded in)
LOADED_DTYPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def loaded_dtypes(model) -> dict:
    """Parameter name -> dtype, every name a parameter is registered under."""
    return {name: p.dtype for name, p in model.named_parameters(remove_duplicate=False)}


def _get_state_dict(variant: Variant, installed):
    def get_state_dict(self, model, unwrap=True):
        """The installed gather (torch `get_model_state_dict`, full, rank 0 only), then A4 (`as_loaded`)."""
        state_dict = installed(self, model, unwrap)
        if not (variant.state_dict_as_loaded and self.is_fsdp2 and state_dict):
            return state_dict
        return as_loaded(model, state_dict, LOADED_DTYPES.get(model, {}))

    return get_state_dict


def as_loaded(model, state_dict: dict, dtypes: dict) -> dict:
    """A4: one tensor per parameter, under every name it has, in the dtype it was loaded in.

    torch's full-state-dict gather returns a separate tensor per key, so tied
    names (one parameter) come back as two tensors with equal values, and
    transformers' `save_pretrained` (which finds ties by shared storage)
    writes the tie twice; under mixed precision they come back as the fp32
    master weights accelerate 1.14+ upcast a 16-bit model to, and the saved
    checkpoint doubles. Both are undone here: the first name's tensor serves
    every name, cast back to the loaded dtype (exact until training moves it,
    and then the same rounding a plain 16-bit save applies).
    """
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in state_dict]
        if not present:
            continue
        value = state_dict[present[0]]
        want = dtypes.get(present[0])
        if want is not None and value.is_floating_point() and value.dtype != want:
            value = value.to(want)
        for name in present:
            state_dict[name] = value
    return state_dict
