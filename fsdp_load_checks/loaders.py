"""How a rank turns a checkpoint into an FSDP2 model: the thing under test.

A loader is a context manager entered inside each rank around
`from_pretrained` and FSDP2 preparation, so patches never leak into the
parent or the reference. `stock` patches nothing: it is what a fork's CI
runs against its own transformers/accelerate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ContextManager


@dataclass(frozen=True)
class Loader:
    name: str
    summary: str
    patch: Callable[[], ContextManager]


LOADERS: dict[str, Loader] = {
    "stock": Loader("stock", "the installed transformers and accelerate, untouched", contextlib.nullcontext),
}


def get(name: str) -> Loader:
    try:
        return LOADERS[name]
    except KeyError:
        raise KeyError(f"unknown loader {name!r}; choose one of: {', '.join(LOADERS)}") from None
