"""The catalogue of cases the suite knows: the zoo, extra case modules and a user's checkpoints.

Cases are looked up by name in every process (the parent, the reference
process, every rank), so only names cross process boundaries; everything a
process needs to find the same cases travels in environment variables.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
from functools import partial

from fsdp_load_checks import accelerate_config
from fsdp_load_checks.records import Case
from fsdp_load_checks.records.case import MIXED_PRECISION, USER

EXTRA_MODULES_ENV = "FSDP_LOAD_CHECKS_CASE_MODULES"  # comma-separated modules with a CASES list
USER_CHECKPOINTS_ENV = "FSDP_LOAD_CHECKS_CHECKPOINTS"  # JSON list of {"name", "path", "dtype", "imports", "model_class"}


def import_all(modules: tuple[str, ...]) -> None:
    """Import the modules that register a case's architecture with the Auto classes."""
    for module in modules:
        importlib.import_module(module)


def _no_config(name: str, path: str):
    raise RuntimeError(f"case {name} is a checkpoint on disk ({path}); it has no config to build from")


def user_case(name: str, path: str, dtype: str, imports: tuple[str, ...] = (), model_class: str = Case.model_class) -> Case:
    """A user's checkpoint directory as a case, loaded with `model_class` (a name: fsdp_load_checks/model_class.py)."""
    return Case(
        name,
        f"your checkpoint {path}",
        partial(_no_config, name, path),
        imports=tuple(imports),
        dtype=dtype,
        checkpoint=path,
        tags=frozenset({USER}),
        model_class=model_class,
    )


def user_cases() -> list[Case]:
    raw = os.environ.get(USER_CHECKPOINTS_ENV)
    if not raw:
        return []
    return [
        user_case(c["name"], c["path"], c["dtype"], tuple(c.get("imports", ())), c.get("model_class", Case.model_class))
        for c in json.loads(raw)
    ]


# Mixed precision as a dimension of the zoo: these also run as `<case>@bf16` under the shipped bf16 config
# (TRL's FSDP2 config), loading the same checkpoint. Every toy case but the fp32 size classes (nothing to
# upcast; big-llama's bf16 twin carries the size class), and one real architecture per family of layout.
MIXED_PRECISION_SKIP = ("big-llama", "big-qwen3-moe")
MIXED_PRECISION_ARCHS = ("arch-llama", "arch-qwen3-moe", "arch-gemma3-text", "arch-gpt2", "arch-deepseek-v3", "arch-phi3")


def mixed_precision_variants(toy: list[Case], archs: list[Case]) -> list[Case]:
    chosen = [c for c in toy if c.name not in MIXED_PRECISION_SKIP] + [c for c in archs if c.name in MIXED_PRECISION_ARCHS]
    return [c.under(accelerate_config.BF16, "bf16", MIXED_PRECISION) for c in chosen]


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
    variants = mixed_precision_variants(TOY_CASES, ARCH_CASES)
    for case in [*TOY_CASES, *ARCH_CASES, *variants, *extra, *user_cases()]:
        if case.name in cases:
            raise ValueError(f"duplicate case name {case.name!r}")
        cases[case.name] = case
    return cases


def select(names: list[str] | None = None, pattern: str | None = None) -> list[Case]:
    """Cases by exact names, or by names/globs (`arch-*`), in catalogue order; no substring match, so
    `arch-deepseek-v3` never also selects `arch-deepseek-v32`. KeyError names unknown exact names."""
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
