"""Deterministic garbage: memory handed out uninitialised during loading is NaN (ints: max).

Uninitialised memory is whatever the allocator returns, so a bug that
leaves a tensor uninitialised passes or fails by luck. Inside `poisoned()`
it fails every time. The reference and rank 0 always load poisoned (both
are meant to initialise everything); other ranks only with
`--poison-uninitialized`, since filling touches pages and so distorts their
memory figures.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def poisoned(enabled: bool = True):
    if not enabled:
        yield
        return
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
