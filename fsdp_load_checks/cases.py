"""What a case is, and the catalogue of cases the suite knows.

A case is a recipe for a checkpoint: a config built in code, a seed, a
dtype and a few edits to the saved file (keys dropped, keys added). Cases
are looked up by name in every process, so only names cross process
boundaries.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

# tags a known issue can select cases by
PERSISTENT_BUFFER = "persistent-buffer"
BIG = "big"  # hundreds of MiB: the size class the memory check can judge


@dataclass(frozen=True)
class Case:
    name: str
    guards: str  # one line: the bug this case would catch
    config: Callable[[], object]  # returns a transformers PretrainedConfig
    imports: tuple[str, ...] = ()  # modules that register the architecture (toy models)
    dtype: str = "float32"
    seed: int = 0
    drop_keys: tuple[str, ...] = ()  # checkpoint keys removed after saving (missing on load)
    extra_keys: tuple[str, ...] = ()  # keys added to the checkpoint (unexpected on load)
    tags: frozenset[str] = field(default_factory=frozenset)
    fault: str | None = None  # harness self-tests: a fault to inject into one rank (faults.py)
    checkpoint: str | None = None  # a user's checkpoint directory (`fsdp-load-checks check PATH`): nothing is built

    def with_tags(self, *tags: str) -> Case:
        return dataclasses.replace(self, tags=self.tags | frozenset(tags))


def import_all(modules: tuple[str, ...]) -> None:
    for module in modules:
        importlib.import_module(module)


EXTRA_MODULES_ENV = "FSDP_LOAD_CHECKS_CASE_MODULES"
USER_CHECKPOINTS_ENV = "FSDP_LOAD_CHECKS_CHECKPOINTS"  # JSON list of {"name", "path", "dtype", "imports"}


def _no_config(name: str, path: str):
    raise RuntimeError(f"case {name} is a checkpoint on disk ({path}); it has no config to build from")


def user_case(name: str, path: str, dtype: str, imports: tuple[str, ...] = ()) -> Case:
    return Case(
        name,
        f"your checkpoint {path}",
        partial(_no_config, name, path),
        imports=tuple(imports),
        dtype=dtype,
        checkpoint=path,
        tags=frozenset({"user"}),
    )


def user_cases() -> list[Case]:
    import json

    raw = os.environ.get(USER_CHECKPOINTS_ENV)
    return [user_case(c["name"], c["path"], c["dtype"], tuple(c.get("imports", ()))) for c in json.loads(raw)] if raw else []


def all_cases() -> dict[str, Case]:
    """Every case of the zoo, by name, in catalogue order.

    Modules named (comma-separated) in $FSDP_LOAD_CHECKS_CASE_MODULES add
    their `CASES`; the variable reaches every subprocess, so ranks and the
    reference find the same cases as the parent.
    """
    from toy_models.architectures import ARCH_CASES
    from toy_models.zoo import TOY_CASES

    extra = []
    for module in filter(None, os.environ.get(EXTRA_MODULES_ENV, "").split(",")):
        extra.extend(importlib.import_module(module.strip()).CASES)
    cases: dict[str, Case] = {}
    for case in [*TOY_CASES, *ARCH_CASES, *extra, *user_cases()]:
        if case.name in cases:
            raise ValueError(f"duplicate case name {case.name!r}")
        cases[case.name] = case
    return cases


def select(names: list[str] | None = None, pattern: str | None = None) -> list[Case]:
    """Cases by exact names, or by names/globs (`arch-*`), in catalogue order; no substring match, so
    `arch-deepseek-v3` never also selects `arch-deepseek-v32`."""
    import fnmatch

    catalogue = all_cases()
    if names:
        unknown = [n for n in names if n not in catalogue]
        if unknown:
            raise KeyError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(catalogue)}")
        return [catalogue[n] for n in names]
    if pattern:
        globs = [p.strip() for p in pattern.split(",") if p.strip()]
        return [c for c in catalogue.values() if any(fnmatch.fnmatchcase(c.name, g) for g in globs)]
    return list(catalogue.values())
