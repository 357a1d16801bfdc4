"""Layouts as cases: a case per layout, tagged by what it holds, and the layouts file every process reads.

The cases of this package (`toy_models.generated.CASES`, read through
$FSDP_LOAD_CHECKS_CASE_MODULES like any extra case module) are the layouts
listed in the JSON file named by $FSDP_LOAD_CHECKS_GENERATED_LAYOUTS (a list
of layouts, or one layout), re-read whenever the file changes, so the
reference process and every rank find the same cases by name.

Tags (and `Case.tensors`) say what a layout holds, so the known-issue
registry (fsdp_load_checks/known_issues.py) selects generated layouts the
way it selects the zoo's cases, and matches exactly the tensors a bug
affects in each.
"""

from __future__ import annotations

import json
import os
from functools import partial

from fsdp_load_checks.records import PERSISTENT_BUFFER, Case
from fsdp_load_checks.records.case import (
    FORGOTTEN_BUFFER,
    FORGOTTEN_FLOAT_BUFFER,
    MISSING_PARAMETERS,
    ROOT_NON_PERSISTENT,
    SHARED_NON_PERSISTENT,
)
from toy_models.generated.layout import (
    describe,
    features,
    layout_name,
    tensor_specs,
    validate,
)
from toy_models.generated.model import GeneratedConfig, initial_value

LAYOUTS_ENV = "FSDP_LOAD_CHECKS_GENERATED_LAYOUTS"
IMPORTS = ("toy_models.generated",)

# tags only generated layouts carry
GENERATED = "generated"
TIED = "tied-parameters"
DROPPED = "dropped-keys"


def layout_case(layout: dict) -> Case:
    """The layout as a case, named by its content (`layout_name`), tagged by what it holds."""
    validate(layout)
    feats = features(layout)
    specs = tensor_specs(layout)
    tags = {GENERATED}
    tensors: dict[str, tuple[str, ...]] = {}
    if any(s["kind"] == "buffer" and s["persistent"] for s in specs.values()):
        tags.add(PERSISTENT_BUFFER)
    forgotten = [n for n, s in specs.items() if s["kind"] == "buffer" and s["init"] == "forgotten"]
    if forgotten:
        # aliases are the same tensor under another name: forgotten with their source
        tensors[FORGOTTEN_BUFFER] = (*forgotten, *(a["alias"] for a in layout["shared"] if a["source"] in forgotten))
    floats = [n for n in forgotten if specs[n]["dtype"] == "float32"]
    if floats:
        tensors[FORGOTTEN_FLOAT_BUFFER] = tuple(floats)
    if "shared:non-persistent" in feats:
        tags.add(SHARED_NON_PERSISTENT)
    root = root_recomputed(layout)
    if root:
        tensors[ROOT_NON_PERSISTENT] = tuple(root)
    if layout["ties"] or layout["tie_embeddings"]:
        tags.add(TIED)
    if layout["drop_keys"]:
        tags.add(DROPPED)
    # embedding and head are parameters outside the specs; tie sources are never dropped (droppable_keys)
    missing = [k for k in layout["drop_keys"] if k not in specs or specs[k]["kind"] == "param"]
    if missing:
        tensors[MISSING_PARAMETERS] = tuple(missing)
    case = Case(
        layout_name(layout),
        f"generated layout ({describe(layout)})",
        partial(GeneratedConfig, layout=layout),
        imports=IMPORTS,
        dtype=layout["dtype"],
        drop_keys=tuple(layout["drop_keys"]),
        tags=frozenset(tags),
    )
    return case.with_tags(tensors=tensors)


def root_recomputed(layout: dict) -> list[str]:
    """Recomputed non-persistent buffers on the top-level model whose value a zeros placeholder cannot fake."""
    return [
        n
        for n, s in tensor_specs(layout).items()
        if "." not in n and s["kind"] == "buffer" and not s["persistent"] and s["init"] == "recomputed"
        and bool(initial_value(n, s).any())
    ]


def read_layouts(path: str) -> list[dict]:
    raw = json.loads(open(path).read())
    return [raw] if isinstance(raw, dict) else list(raw)


def write_layouts(path, layouts: list[dict]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(layouts, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


_cache: dict[tuple, list[Case]] = {}


def env_cases() -> list[Case]:
    """The layouts named by $FSDP_LOAD_CHECKS_GENERATED_LAYOUTS, as cases (duplicates once)."""
    path = os.environ.get(LAYOUTS_ENV)
    if not path:
        return []
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _cache:
        seen: dict[str, Case] = {}
        for layout in read_layouts(path):
            case = layout_case(layout)
            seen.setdefault(case.name, case)
        _cache.clear()
        _cache[key] = list(seen.values())
    return _cache[key]
