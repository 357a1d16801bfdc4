"""The reference's side of the after-loading checks: the plain load's state dict, its save, its training step.

`steps` yields (phase, step) pairs that reference/plain.py runs after its
forward pass, so a failure is attributed to its phase like a rank's:

  STATE_DICT  the plain load's `state_dict()` with every parameter in the dtype it was loaded in
              (under mixed precision the model holds fp32 master weights by then; the upcast was
              exact, so casting back is too), and what its `save_pretrained` writes: transformers'
              own convention for tied parameters and non-persistent buffers.
  TRAIN_STEP  training.plain_step: the step every rank must match, emulating the FSDP2 mixed-precision
              policy when the config has one.

`model` is the one every rank's prepared model should equal: the plain load with its parameters upcast
under mixed precision and its non-persistent buffers at their `__init__` values (plain.observe_plain).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from fsdp_load_checks import state_dicts, training
from fsdp_load_checks.records import Observation, Phase


def loaded_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """Parameter name -> the dtype from_pretrained gave it (before any upcast)."""
    return {name: p.dtype for name, p in model.named_parameters(remove_duplicate=False)}


@contextlib.contextmanager
def as_loaded(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> Iterator[None]:
    """Every parameter temporarily back in its loaded dtype (exact: it was only ever upcast), then restored."""
    changed = []
    for name, param in model.named_parameters():
        want = dtypes.get(name, param.dtype)
        if param.dtype != want:
            changed.append((param, param.data))
            param.data = param.data.to(want)
    try:
        yield
    finally:
        for param, data in changed:
            param.data = data


def steps(obs: Observation, model: torch.nn.Module, dtypes: dict[str, torch.dtype],
          compute: torch.dtype | None) -> Iterator[tuple[Phase, Callable[[], None]]]:
    def state_dict() -> None:
        with as_loaded(model, dtypes):
            obs.state_dict = state_dicts.records(model.state_dict(), state_dicts.kinds_of(model))
            obs.saved = state_dicts.plain_save_records(model)

    def train_step() -> None:
        obs.train = training.plain_step(model, compute)

    yield Phase.STATE_DICT, state_dict
    yield Phase.TRAIN_STEP, train_step
