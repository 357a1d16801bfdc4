"""Smaller layouts: the candidates a shrinker tries next, numbered the way the strategy numbers them."""

from __future__ import annotations

import json

from toy_models.generated.layout import (
    holds_extra,
    layout_name,
    module_order,
    tensor_specs,
    validate,
)


def renumber(layout: dict) -> dict:
    """The layout with modules, tensors, tie targets and aliases numbered in creation order, as the
    strategy names them; so a layout simplified by hand or by `simplifications` gets the name
    hypothesis would give the same draw."""
    old_order = [p for p in module_order(layout) if p in layout["modules"] or p == "model"]
    paths: dict[str, str] = {"": "", "model": "model"}
    m = 0
    for path in old_order:
        if path in ("", "model"):
            continue
        parent = path.rpartition(".")[0]
        paths[path] = f"{paths[parent]}.m{m}"
        m += 1
    names: dict[str, str] = {}
    modules: dict[str, list] = {}
    t = 0
    for path in old_order:
        if path not in layout["modules"]:
            continue
        new_path = paths[path]
        modules[new_path] = []
        for spec in layout["modules"][path]:
            local = f"p{t}_weight" if spec["kind"] == "param" else f"b{t}"
            t += 1
            old_full = f"{path}.{spec['name']}" if path else spec["name"]
            names[old_full] = f"{new_path}.{local}" if new_path else local
            modules[new_path].append({**spec, "name": local})

    def moved(full: str, local: str) -> str:
        path = full.rpartition(".")[0]
        return f"{paths[path]}.{local}" if paths[path] else local

    return {
        **layout,
        "modules": modules,
        "ties": [
            {"source": names[tie["source"]], "target": moved(tie["target"], f"t{i}_weight")}
            for i, tie in enumerate(layout["ties"])
        ],
        "shared": [{"source": names[a["source"]], "alias": moved(a["alias"], "s0")} for a in layout["shared"]],
        "drop_keys": [names.get(k, k) for k in layout["drop_keys"]],
    }


def _without(layout: dict, gone_tensors: set[str], gone_modules: set[str] = frozenset()) -> dict:
    """Drop tensors/modules and everything that refers to them (ties, aliases, dropped keys)."""
    out = json.loads(json.dumps(layout))
    for path in gone_modules:
        out["modules"].pop(path, None)
    for path, ts in list(out["modules"].items()):
        out["modules"][path] = [t for t in ts if (f"{path}.{t['name']}" if path else t["name"]) not in gone_tensors]
    alive = lambda full: full.rpartition(".")[0] not in gone_modules and full not in gone_tensors  # noqa: E731
    out["ties"] = [t for t in out["ties"] if alive(t["source"]) and alive(t["target"])]
    out["shared"] = [a for a in out["shared"] if alive(a["source"]) and alive(a["alias"])]
    out["drop_keys"] = [k for k in out["drop_keys"] if alive(k)]
    for path in ("", "model"):
        if path in out["modules"] and not out["modules"][path] and not holds_extra(out, path):
            del out["modules"][path]
    return out


def simplifications(layout: dict) -> list[dict]:
    """Valid layouts one step simpler than this one, boldest first: what a shrinker tries next.

    Used to prefetch shrink candidates in one launch; hypothesis still decides what is smaller.
    """
    out: list[dict] = []
    tree = [p for p in layout["modules"] if p.startswith("model.")]
    for path in tree:  # a whole subtree
        gone = {p for p in layout["modules"] if p == path or p.startswith(path + ".")}
        out.append(_without(layout, set(), gone))
    for full in tensor_specs(layout):
        out.append(_without(layout, {full}))
    for key in ("ties", "shared", "drop_keys"):
        for i in range(len(layout[key])):
            out.append({**layout, key: layout[key][:i] + layout[key][i + 1 :]})
    for key, simple in (("dtype", "float32"), ("tie_embeddings", False)):
        if layout[key] != simple:
            out.append({**layout, key: simple})
    # every smaller size (hypothesis walks integers down), both at their smallest first
    if layout["vocab_size"] > 1 and layout["hidden_size"] > 1:
        out.append({**layout, "vocab_size": 1, "hidden_size": 1})
    for key in ("hidden_size", "vocab_size"):
        out += [{**layout, key: n} for n in range(1, layout[key])]
    for path, ts in layout["modules"].items():
        for i, spec in enumerate(ts):
            simpler = []
            if spec["shape"] != ([1] if spec["kind"] == "param" else []):
                simpler.append({**spec, "shape": [1] if spec["kind"] == "param" else []})
            if spec["kind"] == "buffer":
                if spec["persistent"]:
                    simpler.append({**spec, "persistent": False})
                if spec["init"] == "forgotten":
                    simpler.append({**spec, "init": "recomputed"})
                if spec["dtype"] != "float32":
                    simpler.append({**spec, "dtype": "float32"})
            for new in simpler:
                modules = {**layout["modules"], path: ts[:i] + [new] + ts[i + 1 :]}
                out.append({**layout, "modules": modules})
    valid, seen = [], {layout_name(layout)}
    for candidate in out:
        try:
            candidate = renumber(candidate)
            validate(candidate)
        except (ValueError, KeyError):
            continue
        if layout_name(candidate) not in seen:
            seen.add(layout_name(candidate))
            valid.append(candidate)
    return valid

