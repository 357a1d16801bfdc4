"""Helpers over a model's tensors by name: one home for each, used by ranks, the reference and the loaders.

No transformers or accelerate import at module level: ranks import this
before they need either.
"""

from __future__ import annotations

import copy

import torch


def non_persistent_names(model: torch.nn.Module) -> set[str]:
    """Every name a non-persistent buffer is registered under (duplicates kept: a shared buffer has several)."""
    names = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        names.update(prefix + b for b in module._non_persistent_buffers_set)
    return names


def set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` under `name`: as a buffer if the name is a buffer, else as a frozen parameter."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)


def persistent_buffer_names(model: torch.nn.Module) -> list[str]:
    """State-dict keys that are buffers (persistent buffers), in state-dict order."""
    buffers = {name for name, _ in model.named_buffers()}
    return [name for name in model.state_dict() if name in buffers]


def buffer_groups(model: torch.nn.Module) -> list[list[str]]:
    """Every buffer tensor as the list of names it is registered under, in registration order."""
    by_tensor: dict[int, list[str]] = {}
    for name, buf in model.named_buffers(remove_duplicate=False):
        by_tensor.setdefault(id(buf), []).append(name)
    return list(by_tensor.values())


def non_persistent_groups(model: torch.nn.Module) -> list[list[str]]:
    """Every non-persistent buffer tensor as the list of its non-persistent names, in registration order."""
    names = non_persistent_names(model)
    groups = ([n for n in group if n in names] for group in buffer_groups(model))
    return [group for group in groups if group]


def shared_buffer_names(model: torch.nn.Module) -> list[list[str]]:
    """Names of each buffer tensor registered under more than one name, in registration order."""
    return [names for names in buffer_groups(model) if len(names) > 1]


def share_buffer(model: torch.nn.Module, names: list[str]) -> None:
    """Put the one materialised tensor of a shared buffer back under all of its names."""
    tensors = [model.get_buffer(n) for n in names]
    real = next((t for t in tensors if t.device.type != "meta"), None)
    if real is not None:
        for name in names:
            set_tensor(model, name, real)


def init_non_persistent(model_class: type, config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Non-persistent buffers as the model's own `__init__` computes them, by every name they have.

    transformers 5 builds models on meta and restores such buffers only
    through `_init_weights`, so by the time a model is loaded their
    `__init__` values are gone. A second construction, parameters on meta
    and buffers real, gets them back: the value the model's author meant.
    The reference (what "correct" means) and the fixed loader (T2) both call
    this, so they agree bit for bit.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        skeleton = model_class._from_config(copy.deepcopy(config), dtype=dtype)
    names = non_persistent_names(skeleton)
    return {
        name: buf
        for name, buf in skeleton.named_buffers(remove_duplicate=False)
        if name in names and buf.device.type != "meta"
    }
