"""The order xdist hands out the test modules in (`--dist loadfile --no-loadscope-reorder`, pyproject.toml).

A module is one unit of work (its tests share module-scoped launches), so the run ends when the last long
module does. Longest first, by item time measured on the README test command (2 cores, seconds per module
in one run): a module of a few long items (signals, multinode) started last would leave the other worker
idle while it runs. Modules not listed follow, in file order.
"""

from __future__ import annotations

LONGEST_FIRST = [
    "test_zoo",  # ~300 s: the zoo's launch
    "test_cli",  # ~210 s
    "test_detection",  # ~190 s
    "test_concurrency",  # ~190 s
    "test_multinode",  # ~190 s
    "test_launch",  # ~150 s
    "test_signals",  # ~110 s
    "test_generated",  # ~110 s
    "test_preparation",  # ~110 s
    "test_user_checkpoint_memory",  # ~70 s
    "test_hangs",  # ~65 s
    "test_native_loader",  # ~40 s
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))  # stable
