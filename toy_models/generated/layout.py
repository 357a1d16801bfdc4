"""The layout: a generated model as plain JSON, its schema, and what it exercises.

A *layout* is plain JSON (dicts, lists, strings, ints, bools): the module
tree, every parameter and buffer with its shape, dtype, persistence and
whether `_init_weights` recomputes it, the ties, the buffer shared between
two modules, the checkpoint keys to drop and the model dtype. It travels
inside the config (`GeneratedConfig.layout`), so the checkpoint's
config.json alone rebuilds the model in any process.

    {
      "dtype": "float32" | "bfloat16",
      "vocab_size": 5, "hidden_size": 3,
      "tie_embeddings": false,                    # lm_head.weight <- model.embed_tokens.weight
      "modules": {                                # path under the root -> its own tensors, in order;
        "model.m0": [                             # "" (the root) and "model" (the base model) may hold
          {"name": "p0_weight", "kind": "param", "shape": [3, 1]},   # tensors too; tree modules are
          {"name": "b1", "kind": "buffer", "shape": [],              # model.mI[.mJ[.mK]] (depth 1-3)
           "dtype": "float32" | "int64" | "bool",
           "persistent": false, "init": "recomputed" | "forgotten"}  # forgotten: non-persistent only
        ], ...},
      "ties": [{"source": "model.m0.p0_weight", "target": "model.m1.t0_weight"}],
      "shared": [{"source": "model.m0.b1", "alias": "model.m1.s0"}],  # one non-persistent tensor, two modules
      "drop_keys": ["model.m0.p0_weight"]         # removed from the saved checkpoint
    }
"""

from __future__ import annotations

import hashlib
import json
import math
import re

BUFFER_DTYPES = ("float32", "int64", "bool")


def canonical(layout: dict) -> str:
    return json.dumps(layout, sort_keys=True, separators=(",", ":"))


def layout_name(layout: dict) -> str:
    """A case name that is a function of the layout alone: the same layout is the same case everywhere."""
    return "gen-" + hashlib.sha256(canonical(layout).encode()).hexdigest()[:10]


def tensor_specs(layout: dict) -> dict[str, dict]:
    """Every tensor the layout declares (tie targets and aliases excluded), by full name."""
    return {f"{path}.{t['name']}" if path else t["name"]: t for path, ts in layout["modules"].items() for t in ts}


def checkpoint_keys(layout: dict) -> list[str]:
    """Keys save_pretrained writes: embedding, head (unless tied), params, persistent buffers, persistent aliases."""
    keys = ["model.embed_tokens.weight"]
    if not layout["tie_embeddings"]:
        keys.append("lm_head.weight")
    specs = tensor_specs(layout)
    keys += [n for n, s in specs.items() if s["kind"] == "param" or s["persistent"]]
    keys += [a["alias"] for a in layout["shared"] if specs[a["source"]]["kind"] == "buffer" and specs[a["source"]]["persistent"]]
    return keys


def droppable_keys(layout: dict) -> list[str]:
    """Keys the strategy may drop: never both sides of a tie, never a shared buffer."""
    tied = {t["source"] for t in layout["ties"]}
    if layout["tie_embeddings"]:
        tied.add("model.embed_tokens.weight")
    shared = {a["source"] for a in layout["shared"]} | {a["alias"] for a in layout["shared"]}
    return [k for k in checkpoint_keys(layout) if k not in tied and k not in shared]


def features(layout: dict) -> set[str]:
    """What a layout exercises, for coverage assertions and tags."""
    specs = tensor_specs(layout)
    out = {f"dtype:{layout['dtype']}"}
    depth = max((p.count(".") for p in layout["modules"] if p.startswith("model.")), default=0)
    out.add(f"depth:{depth}")
    for s in specs.values():
        shape = s["shape"]
        numel = math.prod(shape)
        if s["kind"] == "param":
            out.add("param")
            if not shape:
                out.add("param:0-dim")
            if numel == 1:
                out.add("param:1-element")
            if any(d % 2 for d in shape[:1]):
                out.add("param:uneven-dim0")
        else:
            out.add(f"buffer:{s['dtype']}")
            out.add("buffer:persistent" if s["persistent"] else "buffer:non-persistent")
            if not shape:
                out.add("buffer:scalar")
            if not s["persistent"]:
                out.add(f"buffer:{s['init']}")
    if layout["tie_embeddings"]:
        out.add("tie:embeddings")
    if layout["ties"]:
        out.add("tie:params")
    for a in layout["shared"]:
        out.add("shared:non-persistent")
    if layout["drop_keys"]:
        out.add("drop")
    if "" in layout["modules"] or "model" in layout["modules"]:
        out.add("root-tensors")
    return out


def validate(layout: dict) -> None:
    """Raise ValueError naming the first thing wrong with a layout (a hand-edited replay file, say)."""
    for key in ("dtype", "vocab_size", "hidden_size", "tie_embeddings", "modules", "ties", "shared", "drop_keys"):
        if key not in layout:
            raise ValueError(f"layout has no {key!r}")
    if layout["dtype"] not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {layout['dtype']!r} is not float32 or bfloat16")
    if layout["vocab_size"] < 1 or layout["hidden_size"] < 1:
        raise ValueError("vocab_size and hidden_size must be positive")
    paths = list(layout["modules"])
    for path in paths:
        if path in ("", "model"):
            continue
        if not re.fullmatch(r"model(\.m\d+){1,3}", path):
            raise ValueError(f"module path {path!r} is not model.mI[.mJ[.mK]]")
        parent = path.rsplit(".", 1)[0]
        if parent != "model" and parent not in layout["modules"]:
            raise ValueError(f"module {path!r} has no parent {parent!r} in the layout")
    if not any(p.startswith("model.") for p in paths):
        raise ValueError("layout has no module under model")
    names: set[str] = set()
    for path, ts in layout["modules"].items():
        for t in ts:
            full = f"{path}.{t['name']}" if path else t["name"]
            if full in names or not re.fullmatch(r"[pb]\d+(_weight)?", t["name"]):
                raise ValueError(f"bad or duplicate tensor name {full!r}")
            names.add(full)
            if t["kind"] not in ("param", "buffer") or any(not isinstance(d, int) or d < 1 for d in t["shape"]):
                raise ValueError(f"{full}: bad kind or shape {t}")
            if t["kind"] == "buffer":
                if t["dtype"] not in BUFFER_DTYPES or t["init"] not in ("recomputed", "forgotten"):
                    raise ValueError(f"{full}: bad dtype or init {t}")
                if t["persistent"] and t["init"] == "forgotten":
                    raise ValueError(f"{full}: only non-persistent buffers can be forgotten by _init_weights")
    specs = tensor_specs(layout)
    for tie in layout["ties"]:
        if specs.get(tie["source"], {}).get("kind") != "param":
            raise ValueError(f"tie source {tie['source']!r} is not a parameter of the layout")
        path, _, name = tie["target"].rpartition(".")
        if path not in layout["modules"] or not re.fullmatch(r"t\d+_weight", name) or tie["target"] in names:
            raise ValueError(f"bad tie target {tie['target']!r}")
        names.add(tie["target"])
    for alias in layout["shared"]:
        if specs.get(alias["source"], {}).get("kind") != "buffer" or specs[alias["source"]]["persistent"]:
            # a persistent one cannot even be saved: save_pretrained refuses shared tensors that are not tied weights
            raise ValueError(f"shared source {alias['source']!r} is not a non-persistent buffer of the layout")
        path, _, name = alias["alias"].rpartition(".")
        if path not in layout["modules"] or not re.fullmatch(r"s\d+", name) or alias["alias"] in names:
            raise ValueError(f"bad shared alias {alias['alias']!r}")
        order = module_order(layout)
        if order.index(path) <= order.index(alias["source"].rpartition(".")[0]):
            raise ValueError(f"shared alias {alias['alias']!r} must be in a module registered after its source's")
        names.add(alias["alias"])
    keys = set(checkpoint_keys(layout))
    for key in layout["drop_keys"]:
        if key not in keys:
            raise ValueError(f"drop key {key!r} is not a checkpoint key")


def module_order(layout: dict) -> list[str]:
    """The order modules register their tensors in: root, base model, then the tree depth-first."""
    order = ["", "model"]

    def walk(path):
        for child in children(path, layout):
            order.append(child)
            walk(child)

    walk("model")
    return order


def children(path: str, layout: dict) -> list[str]:
    prefix = f"{path}."
    return [p for p in layout["modules"] if p.startswith(prefix) and "." not in p[len(prefix):]]


def holds_extra(layout: dict, path: str) -> bool:
    return any(t["target"].rpartition(".")[0] == path for t in layout["ties"]) or any(
        a["alias"].rpartition(".")[0] == path for a in layout["shared"]
    )


def example_layout() -> dict:
    return {
        "dtype": "float32",
        "vocab_size": 5,
        "hidden_size": 3,
        "tie_embeddings": False,
        "modules": {"model.m0": [{"name": "p0_weight", "kind": "param", "shape": [3, 2]}]},
        "ties": [],
        "shared": [],
        "drop_keys": [],
    }


def describe(layout: dict) -> str:
    return ", ".join(sorted(features(layout)))

