"""FSDP2 preparation the way users run it: `Accelerator.prepare(model, optimizer)`, on CUDA and on CPU.

Every rank exports the environment `accelerate launch --config_file` would
have exported (`accelerate_config.py` builds it in the parent), builds one
`Accelerator` per launch (another, from scratch, when a case runs under
another config: `remake_accelerator`) and, per case, a fresh
`FullyShardedDataParallelPlugin()` that reads that environment, then calls
`accelerator.prepare(model, AdamW(model.parameters()))`, which is
accelerate's `_prepare_fsdp2`: wrap policy, activation checkpointing,
compile, `fsdp2_prepare_model` (with its mixed-precision upcast) and the
optimizer's parameter swap. The same call on CPU and CUDA.

Forced on CPU only, because accelerate switches to FSDP only on accelerator
devices (`AcceleratorState.__init__` sets `DistributedType.FSDP` for
MULTI_GPU/NPU/XPU/... but leaves MULTI_CPU alone):

- `distributed_type = DistributedType.FSDP`, in AcceleratorState's AND
  PartialState's shared state: `AcceleratedOptimizer` builds a new
  `AcceleratorState()`, which copies PartialState's MULTI_CPU back, after
  which the next case of the launch would be wrapped in DDP instead.
- `state.fsdp_plugin = plugin` and `plugin.set_mixed_precision(...)`: what
  the same branch of `AcceleratorState.__init__` does on a GPU.

Per case on both devices: a fresh plugin (`set_auto_wrap_policy` freezes
the first model's layer classes into it) and the config's environment
exported again (a plugin built with explicit arguments rewrites
`FSDP_CPU_RAM_EFFICIENT_LOADING`; re-exporting keeps every case on the path
under test).
"""

from __future__ import annotations

import os

import torch

from fsdp_load_checks.training import make_optimizer


def export_env(env: dict[str, str]) -> None:
    """What `accelerate launch` exports for the config; transformers and accelerate read it."""
    os.environ.update(env)


def _force_fsdp_on_cpu(accelerator) -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def make_accelerator(device: torch.device, env: dict[str, str]):
    """The launch's Accelerator, configured from `env` (mixed precision from ACCELERATE_MIXED_PRECISION)."""
    from accelerate import Accelerator

    export_env(env)
    accelerator = Accelerator(cpu=device.type == "cpu")
    if device.type == "cpu":
        _force_fsdp_on_cpu(accelerator)
    return accelerator


def remake_accelerator(device: torch.device, old_env: dict[str, str], env: dict[str, str]):
    """A new Accelerator for a case under another accelerate config, built as a fresh process builds it.

    accelerate keeps one state per process (AcceleratorState, PartialState, GradientState: shared dicts);
    an Accelerator under another mixed precision raises while it is set. Resetting all three, as
    accelerate's own tests do between configs (test_utils `AccelerateTestCase.tearDown`), leaves only the
    process group, which PartialState finds initialised and keeps; the old config's variables the new one
    does not set are removed, as in a process `accelerate launch` started with the new config.
    """
    from accelerate.state import AcceleratorState, GradientState

    # the old Accelerator holds nothing by now: run_case's cleanup freed what each case's prepare registered
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    for key in old_env.keys() - env.keys():
        os.environ.pop(key, None)
    return make_accelerator(device, env)


def fresh_plugin(accelerator, env: dict[str, str]):
    """A new plugin read from the config's environment, installed as accelerate's own branch would."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    export_env(env)
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    if accelerator.device.type == "cpu":
        _force_fsdp_on_cpu(accelerator)
    export_env(env)
    return plugin


def prepare(accelerator, model: torch.nn.Module, env: dict[str, str]):
    """`accelerator.prepare(model, AdamW(model.parameters()))` with a fresh plugin; (model, optimizer, how, sizes).

    `how` is read back from accelerate's own bookkeeping after the call, so a
    test can tell that the real `Accelerator.prepare` ran (not a shortcut):
    the model is the one accelerate registered, the optimizer is accelerate's
    `AcceleratedOptimizer`, and `is_fsdp2` held. `sizes` are the terms of the
    preparation memory bound (records.MemoryProfile: prepared_sizes' and
    upcast_bytes).
    """
    from accelerate.optimizer import AcceleratedOptimizer
    from torch.distributed.fsdp import FSDPModule

    fresh_plugin(accelerator, env)
    upcast = upcast_bytes(model) if accelerator.mixed_precision != "no" else 0
    optimizer = make_optimizer(model.parameters())  # the reference's train step steps the same optimizer
    model, optimizer = accelerator.prepare(model, optimizer)
    how = {
        "call": "Accelerator.prepare",
        "registered_model": any(m is model for m in accelerator._models),
        "optimizer": type(optimizer).__name__ if isinstance(optimizer, AcceleratedOptimizer) else "not accelerate's",
        "is_fsdp2": bool(accelerator.is_fsdp2),
        "fsdp_module": isinstance(model, FSDPModule),
        "mixed_precision": str(accelerator.mixed_precision),
        "device": accelerator.device.type,
    }
    return model, optimizer, how, {**prepared_sizes(model), "upcast_bytes": upcast}


def upcast_bytes(model: torch.nn.Module) -> int:
    """Bytes of the fp32 copies accelerate 1.14+ makes of trainable non-fp32 parameters under mixed precision."""
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad and p.dtype != torch.float32)


def prepared_sizes(model: torch.nn.Module) -> dict[str, int]:
    """The measured terms of the preparation memory bound (records.MemoryProfile fields), in bytes.

    - `shard_bytes`: the rank's parameter shards as FSDP2 stores them, each padded to the first chunk's rows
      (torch.chunk's split of dim 0: torch 2.13 FSDPParam._init_sharded_param), plus its buffers, whole;
    - `largest_tensor_bytes`: the largest full parameter, one broadcast receive buffer
      (accelerate's `fsdp2_load_full_state_dict` receives one tensor at a time);
    - `padded_chunk_bytes`: at an uneven split, torch's `Shard._shard_tensor` (distribute_tensor) pads a copy of
      every short chunk on every rank (`_split_tensor(with_padding=True)`, torch 2.13
      distributed/tensor/placement_types.py) while the full tensor is alive: the most a tensor in flight
      then adds beyond `largest_tensor_bytes`;
    - `repadded_bytes`: the shards this rank holds short of the padded size (at an uneven split the last rank's,
      or the last few ranks' when torch.chunk leaves some empty).
      accelerate's `fsdp2_load_full_state_dict` ends with `model.load_state_dict(sharded_sd, assign=True)`
      while `sharded_sd` (and the last full tensor) still live, and FSDP2's `reset_sharded_param` (torch 2.13
      _fsdp_param.py) copies each short shard into new padded storage: the rank holds them twice.

    The last two are 0 when every sharded dim divides by the world size.
    """
    from torch.distributed.tensor import DTensor, Shard

    sizes = dict.fromkeys(("shard_bytes", "largest_tensor_bytes", "padded_chunk_bytes", "repadded_bytes"), 0)
    in_flight = 0  # the most one tensor costs while it is distributed: its full bytes (+ padded short chunks)
    for param in model.parameters():
        full = param.numel() * param.element_size()
        sizes["largest_tensor_bytes"] = max(sizes["largest_tensor_bytes"], full)
        dims = [i for i, p in enumerate(getattr(param, "placements", ())) if isinstance(p, Shard) and p.dim == 0]
        if not isinstance(param, DTensor) or not dims or param.shape[0] == 0:
            local = param.to_local() if isinstance(param, DTensor) else param
            sizes["shard_bytes"] += local.numel() * local.element_size()
            in_flight = max(in_flight, full)
            continue
        rows, world = param.shape[0], param.device_mesh.size(dims[0])
        chunk_rows = -(-rows // world)  # torch.chunk: every chunk but the last ones has this many
        chunk = chunk_rows * (full // rows)  # bytes of a padded chunk
        sizes["shard_bytes"] += chunk
        # every chunk short of chunk_rows is padded, empty ones too (5 rows over 4 ranks: 2, 2, 1, 0: two copies)
        in_flight = max(in_flight, full + (world - rows // chunk_rows) * chunk)
        if param.to_local().shape[0] < chunk_rows:  # this rank's chunk is short
            sizes["repadded_bytes"] += chunk
    sizes["padded_chunk_bytes"] = in_flight - sizes["largest_tensor_bytes"]
    sizes["shard_bytes"] += sum(b.numel() * b.element_size() for b in model.buffers())
    return sizes
