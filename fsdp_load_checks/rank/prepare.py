"""FSDP2 preparation through accelerate's own code, on CUDA and on CPU.

accelerate refuses FSDP without an accelerator (the plugin's __post_init__
demands a device when cpu_ram_efficient_loading is on), so on CPU we build
the plugin with the flag off, switch it on afterwards and hand the model to
the real `fsdp2_prepare_model`. That is the function the flag exercises; the
rest of `Accelerator.prepare` (optimizer, dataloader wrapping) is not on the
loading path.
"""

from __future__ import annotations

import os

import torch

ENV_FLAGS = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}


def set_env_flags() -> None:
    """What `accelerate launch` exports for fsdp_cpu_ram_efficient_loading=true; transformers reads them."""
    os.environ.update(ENV_FLAGS)
    os.environ.setdefault("FSDP_VERSION", "2")


def make_accelerator(device: torch.device):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if device.type == "cuda":
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True)
        return Accelerator(fsdp_plugin=plugin)
    accelerator = Accelerator(cpu=True)
    accelerator.state.distributed_type = DistributedType.FSDP
    return accelerator


def fresh_plugin(device: torch.device):
    """A new plugin per model: `set_auto_wrap_policy` freezes the first model's layer classes into it."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if device.type == "cuda":
        return FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=False)
    plugin.cpu_ram_efficient_loading = True
    # the plugin's __post_init__ exports FSDP_CPU_RAM_EFFICIENT_LOADING=False: left so, every later case
    # in this launch would load plainly on every rank and the path under test would go unexercised
    set_env_flags()
    return plugin


def prepare_fsdp2(accelerator, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    accelerator.state.fsdp_plugin = fresh_plugin(device)
    if device.type == "cuda":
        return accelerator.prepare(model)
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, model)
