"""Loaders under test: how a rank turns a checkpoint into an FSDP2 model.

A loader is a context manager entered inside each rank around
`from_pretrained` and FSDP2 preparation, so patches never leak into the
parent or the reference process.

  stock        the installed transformers and accelerate, untouched: what a fork's CI runs
  fixed        stock + the documented fix set (fixed.py, docs/fixed-loader.md)
  <regression> a historical regression re-created on top of `fixed` (regressions.py)
  trainer-args the Trainer's wiring: TrainingArguments built in each rank before loading (trainer.py)
  native-fsdp  transformers' own FSDP2 loading, from_pretrained(distributed_config=...): replaces the load and
               the preparation (native.py)

`reference` is the fixed loader's old name, kept as an alias for one release
(it was easy to confuse with the reference process, the plain single-process
load every rank is compared with).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ContextManager

from fsdp_load_checks.loaders.fixed import BRANCH_ATTR, FIXED, Variant, patched
from fsdp_load_checks.loaders.native import load as native_load
from fsdp_load_checks.loaders.regressions import REGRESSIONS
from fsdp_load_checks.loaders.trainer import trainer_arguments


@dataclass(frozen=True)
class Loader:
    name: str
    summary: str
    patch: Callable[[], ContextManager]
    # replaces `from_pretrained` + `Accelerator.prepare`: (model class, checkpoint, dtype) -> a model already sharded (FSDP2)
    # on every rank, each having read only its slice; None: the env-flag path the other loaders take
    load: Callable | None = None


def _variant_loader(name: str, summary: str, variant: Variant) -> Loader:
    return Loader(name, summary, lambda: patched(variant))


FIXED_LOADER = "fixed"
LOADERS: dict[str, Loader] = {
    "stock": Loader("stock", "the installed transformers and accelerate, untouched", contextlib.nullcontext),
    FIXED_LOADER: _variant_loader(
        FIXED_LOADER,
        "stock + the documented fix set (docs/fixed-loader.md): persistent buffers broadcast (accelerate #3898), "
        "rank 0's non-persistent buffers broadcast, __init__ values for buffers _init_weights forgets, shared buffers kept",
        FIXED,
    ),
}
for _r in REGRESSIONS:
    LOADERS[_r.name] = _variant_loader(_r.name, _r.summary, replace(FIXED, **_r.changes))
LOADERS["trainer-args"] = Loader(
    "trainer-args",
    "the Trainer's wiring under plain torchrun: TrainingArguments(fsdp=True, fsdp_config={version: 2, "
    "cpu_ram_efficient_loading: True}) built in each rank before from_pretrained, no accelerate launch",
    trainer_arguments,
)
LOADERS["native-fsdp"] = Loader(
    "native-fsdp",
    "transformers' own FSDP2 loading: from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N)), "
    "every rank reads its slice, no accelerate env flags, no Accelerator.prepare (transformers 5.16+)",
    contextlib.nullcontext,
    load=native_load,
)

# old name -> new name; an alias loads exactly what its target loads, and is dropped after one release
ALIASES = {"reference": FIXED_LOADER}


def canonical(name: str) -> str:
    """The loader's own name for `name` (an alias resolves to its target). KeyError: unknown, with the choices."""
    name = ALIASES.get(name, name)
    if name not in LOADERS:
        choices = ", ".join([*LOADERS, *(f"{a} (alias of {t})" for a, t in ALIASES.items())])
        raise KeyError(f"unknown loader {name!r}; choose one of: {choices}")
    return name


def get(name: str) -> Loader:
    return LOADERS[canonical(name)]


def load_branch(model) -> str | None:
    """Which transformers branch `from_pretrained` took on this rank, as a loader built on the fixed patch set
    records it (`non-loading-rank` on ranks 1..N of a node under cpu_ram_efficient_loading); None for the
    others (stock, native-fsdp) and on LOCAL_RANK 0."""
    return getattr(model, BRANCH_ATTR, None)
