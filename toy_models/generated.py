"""Generated model layouts: a random module tree becomes a real `PreTrainedModel` and a case.

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

Every parameter and every buffer (any dtype) feeds the logits through a
fixed, name-keyed linear map, so a wrong value on any rank changes the
forward check as well as the tensor checks.

Cases: `layout_case(layout)`. The cases of this module (`CASES`, read
through $FSDP_LOAD_CHECKS_CASE_MODULES like any extra case module) are the
layouts listed in the JSON file named by $FSDP_LOAD_CHECKS_GENERATED_LAYOUTS
(a list of layouts, or one layout), re-read whenever the file changes, so
the reference process and every rank find the same cases by name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import zlib
from functools import partial

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutput

from fsdp_load_checks.cases import PERSISTENT_BUFFER, Case

MODEL_TYPE = "fsdp-generated"
LAYOUTS_ENV = "FSDP_LOAD_CHECKS_GENERATED_LAYOUTS"
IMPORTS = ("toy_models.generated",)
PARAM_STD = 0.5  # _init_weights draws parameters from N(0, PARAM_STD)

# tags a case gets from its layout (the known-issue registry can select by them)
GENERATED = "generated"
FORGOTTEN_BUFFER = "forgotten-non-persistent-buffer"
FORGOTTEN_FLOAT_BUFFER = "forgotten-float-non-persistent-buffer"
SHARED_NON_PERSISTENT = "shared-non-persistent-buffer"
ROOT_NON_PERSISTENT = "root-non-persistent-buffer"  # a recomputed non-persistent buffer on the top-level model
TIED = "tied-parameters"
DROPPED = "dropped-keys"

BUFFER_DTYPES = ("float32", "int64", "bool")


# ---------------------------------------------------------------- the layout


def canonical(layout: dict) -> str:
    return json.dumps(layout, sort_keys=True, separators=(",", ":"))


def layout_name(layout: dict) -> str:
    """A case name that is a function of the layout alone: the same layout is the same case everywhere."""
    return "gen-" + hashlib.sha256(canonical(layout).encode()).hexdigest()[:10]


def tensor_specs(layout: dict) -> dict[str, dict]:
    """Every tensor the layout declares (tie targets and aliases excluded), by full name."""
    return {f"{path}.{t['name']}" if path else t["name"]: t for path, ts in layout["modules"].items() for t in ts}


def is_float(spec: dict) -> bool:
    return spec["kind"] == "param" or spec["dtype"] == "float32"


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


# ---------------------------------------------------------------- values


def _key(name: str) -> int:
    return zlib.crc32(name.encode())


def initial_value(name: str, spec: dict) -> torch.Tensor:
    """What `__init__` (and `_init_weights`, unless forgotten) puts in a buffer: never all zeros or all True."""
    shape, numel, k = tuple(spec["shape"]), math.prod(spec["shape"]), _key(name)
    idx = torch.arange(numel, dtype=torch.float64)
    if spec["dtype"] == "float32":
        value = 0.5 + 0.25 * torch.cos(idx * 0.7 + (k % 101) / 17.0)
        return value.to(torch.float32).reshape(shape)
    if spec["dtype"] == "int64":
        return ((torch.arange(numel) * 3 + k) % 7 + 1).reshape(shape)
    # bool: element 0 False (poisoned memory reads True), element 1 True (a zeros placeholder reads False)
    idx = torch.arange(numel)
    return (((idx + k) % 3 != 0) & (idx != 0) | (idx == 1)).reshape(shape)


def mixing(name: str, numel: int, hidden: int) -> torch.Tensor:
    """A fixed (numel, hidden) float32 matrix keyed by the tensor's name: how it enters the hidden state.

    Entries lie in [0.5, 1.5] / sqrt(numel): positive, so a uniform error never cancels out; different
    per element, so a permutation shows too.
    """
    k = _key(name)
    j = torch.arange(numel, dtype=torch.float64)[:, None]
    h = torch.arange(hidden, dtype=torch.float64)[None, :]
    m = 1.0 + 0.5 * torch.cos(j * (0.61 + (k % 89) / 97.0) + h * (1.37 + (k % 53) / 61.0) + (k % 31) / 7.0)
    return (m / math.sqrt(numel)).to(torch.float32)


def contribution(name: str, tensor: torch.Tensor, hidden: int, center: float, scale: float) -> torch.Tensor:
    flat = (tensor.reshape(-1).float() - center) / scale
    return flat @ mixing(name, flat.numel(), hidden).to(flat.device)


def value_stats(spec: dict) -> tuple[float, float]:
    """(typical value, typical spread) of a tensor, so every tensor moves the logits about as much."""
    if spec["kind"] == "param":
        return 0.0, PARAM_STD
    return {"float32": (0.5, 0.25), "int64": (4.0, 2.0), "bool": (0.5, 0.5)}[spec["dtype"]]


# ---------------------------------------------------------------- the model


class GeneratedConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, layout: dict | None = None, **kwargs):
        layout = layout or example_layout()
        self.layout = layout
        self.vocab_size = layout["vocab_size"]
        self.hidden_size = layout["hidden_size"]
        kwargs["tie_word_embeddings"] = bool(layout["tie_embeddings"] or layout["ties"])
        super().__init__(**kwargs)


def _register(module: nn.Module, path: str, layout: dict, made: dict[str, torch.Tensor]) -> None:
    """Create the module's own tensors, tie targets and shared aliases, in a fixed order."""
    specs = layout["modules"].get(path, [])
    module._gen_path = path
    module._gen_specs = specs
    for spec in specs:
        full = f"{path}.{spec['name']}" if path else spec["name"]
        if spec["kind"] == "param":
            tensor = nn.Parameter(torch.empty(spec["shape"]))
            module.register_parameter(spec["name"], tensor)
        else:
            tensor = initial_value(full, spec)
            module.register_buffer(spec["name"], tensor, persistent=spec["persistent"])
        made[full] = tensor
    for tie in layout["ties"]:
        target_path, _, name = tie["target"].rpartition(".")
        if target_path == path:  # a parameter of the source's shape; tie_weights makes it the source
            source = tensor_specs(layout)[tie["source"]]
            module.register_parameter(name, nn.Parameter(torch.empty(source["shape"])))
    for alias in layout["shared"]:
        alias_path, _, name = alias["alias"].rpartition(".")
        if alias_path == path:  # the very tensor the source module registered
            source = tensor_specs(layout)[alias["source"]]
            module.register_buffer(name, made[alias["source"]], persistent=source["persistent"])


def _own_names(path: str, layout: dict) -> list[tuple[str, dict]]:
    """(local name, spec) of every tensor a module uses in forward: its own, tie targets, aliases."""
    specs = tensor_specs(layout)
    out = [(s["name"], s) for s in layout["modules"].get(path, [])]
    out += [(t["target"].rpartition(".")[2], specs[t["source"]]) for t in layout["ties"] if t["target"].rpartition(".")[0] == path]
    out += [(a["alias"].rpartition(".")[2], specs[a["source"]]) for a in layout["shared"] if a["alias"].rpartition(".")[0] == path]
    return out


def _mix_in(module: nn.Module, h: torch.Tensor, layout: dict) -> torch.Tensor:
    path = module._gen_path
    for local, spec in _own_names(path, layout):
        full = f"{path}.{local}" if path else local
        h = h + contribution(full, getattr(module, local), h.shape[-1], *value_stats(spec))
    return h


def module_order(layout: dict) -> list[str]:
    """The order modules register their tensors in: root, base model, then the tree depth-first."""
    order = ["", "model"]

    def walk(path):
        for child in _children(path, layout):
            order.append(child)
            walk(child)

    walk("model")
    return order


def _children(path: str, layout: dict) -> list[str]:
    prefix = f"{path}."
    return [p for p in layout["modules"] if p.startswith(prefix) and "." not in p[len(prefix):]]


class GeneratedModule(nn.Module):
    def __init__(self, path: str, layout: dict, made: dict[str, torch.Tensor]):
        super().__init__()
        self._layout = layout
        _register(self, path, layout, made)
        for child in _children(path, layout):
            self.add_module(child.rpartition(".")[2], GeneratedModule(child, layout, made))

    def forward(self, h):
        h = _mix_in(self, h, self._layout)
        for child in self.children():
            h = child(h)
        return h


class GeneratedPreTrainedModel(PreTrainedModel):
    config_class = GeneratedConfig
    config: GeneratedConfig
    base_model_prefix = "model"
    _no_split_modules = []

    def _init_weights(self, module):
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(module.in_features))
        specs = getattr(module, "_gen_specs", None)
        if not specs:
            return
        for spec in specs:
            full = f"{module._gen_path}.{spec['name']}" if module._gen_path else spec["name"]
            tensor = getattr(module, spec["name"])
            if spec["kind"] == "param":
                init.normal_(tensor, mean=0.0, std=PARAM_STD)
            elif spec["init"] == "recomputed":  # persistent buffers too: a key dropped from the checkpoint needs it
                init.copy_(tensor, initial_value(full, spec))
            # "forgotten": deliberately left alone, like a model whose _init_weights misses a buffer


class GeneratedModel(GeneratedPreTrainedModel):
    def __init__(self, config: GeneratedConfig, made: dict | None = None):
        super().__init__(config)
        layout = config.layout
        made = {} if made is None else made
        self._layout = layout
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        _register(self, "model", layout, made)
        for child in _children("model", layout):
            self.add_module(child.rpartition(".")[2], GeneratedModule(child, layout, made))
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids):
        h = self.embed_tokens(input_ids).float()
        h = _mix_in(self, h, self._layout)
        for name, child in self.named_children():
            if name != "embed_tokens":
                h = child(h)
        return h


class GeneratedForCausalLM(GeneratedPreTrainedModel):
    def __init__(self, config: GeneratedConfig):
        super().__init__(config)
        layout = config.layout
        made: dict[str, torch.Tensor] = {}
        self._layout = layout
        # registration order (see module_order): the root's own tensors, then the base model's, then the tree
        _register(self, "", layout, made)
        self.model = GeneratedModel(config, made)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        ties = {t["target"]: t["source"] for t in layout["ties"]}
        if layout["tie_embeddings"]:
            ties["lm_head.weight"] = "model.embed_tokens.weight"
        self._tied_weights_keys = ties
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, **kwargs):
        h = self.model(input_ids)
        h = _mix_in(self, h, self._layout)
        # through the module, not its .weight: under FSDP2 the head is its own unit, gathered by its forward hook
        logits = self.lm_head(h.to(self.lm_head.weight.dtype))
        return CausalLMOutput(logits=logits)


AutoConfig.register(MODEL_TYPE, GeneratedConfig, exist_ok=True)
AutoModelForCausalLM.register(GeneratedConfig, GeneratedForCausalLM, exist_ok=True)


# ---------------------------------------------------------------- the strategy

MAX_DIM = 7  # shape dims 1..MAX_DIM: odd ones shard unevenly over 2 ranks, 1 leaves a rank an empty shard


def layouts(rare: float = 0.3):
    """Hypothesis strategy for a layout (hypothesis is imported only here: ranks never need it).

    `rare` is the chance a layout uses each feature that breaks the stock stack (persistent
    buffers, forgotten buffers, a shared buffer, tensors on the root module), so a batch keeps
    plenty of layouts the stock stack must load cleanly. Every choice shrinks towards the plain
    case: fewer modules and tensors, parameters before buffers, float32, 1-element dims.
    Parameters are never 0-dim: FSDP2's fully_shard refuses scalar parameters outright.
    Shared buffers are non-persistent: save_pretrained refuses a shared persistent buffer.
    """
    from hypothesis import strategies as st

    # shrinks to False (the first element); True about `rare` of the time
    chance = st.sampled_from([False] * round(10 * (1 - rare)) + [True] * round(10 * rare))

    @st.composite
    def draw_layout(draw):
        allow = {f: draw(chance) for f in ("persistent", "forgotten", "shared", "root")}
        layout = {
            "dtype": draw(st.sampled_from(["float32", "bfloat16"])),
            "vocab_size": draw(st.integers(1, 9)),
            "hidden_size": draw(st.integers(1, 5)),
            "tie_embeddings": draw(st.booleans()),
            "modules": {},
            "ties": [],
            "shared": [],
            "drop_keys": [],
        }
        counters = {"m": 0, "t": 0}

        def tensor():
            i = counters["t"]
            counters["t"] += 1
            if draw(st.sampled_from(["param", "buffer"])) == "param":
                shape = draw(st.lists(st.integers(1, MAX_DIM), min_size=1, max_size=3))
                return {"name": f"p{i}_weight", "kind": "param", "shape": shape}
            shape = draw(st.lists(st.integers(1, MAX_DIM), min_size=0, max_size=3))
            persistent = draw(st.sampled_from([False, True])) if allow["persistent"] else False
            forgotten = not persistent and allow["forgotten"] and draw(st.sampled_from([False, True]))
            return {
                "name": f"b{i}",
                "kind": "buffer",
                "shape": shape,
                "dtype": draw(st.sampled_from(BUFFER_DTYPES)),
                "persistent": persistent,
                "init": "forgotten" if forgotten else "recomputed",
            }

        def tensors(n_max):
            return [tensor() for _ in range(draw(st.integers(0, n_max)))]

        def grow(parent, depth):
            path = f"{parent}.m{counters['m']}"
            counters["m"] += 1
            layout["modules"][path] = tensors(3)
            if depth < 3:
                for _ in range(draw(st.integers(0, 2 if depth == 1 else 1))):
                    grow(path, depth + 1)

        if allow["root"]:
            for path in ("", "model"):
                own = tensors(2)
                if own:
                    layout["modules"][path] = own
        for _ in range(draw(st.integers(1, 3))):
            grow("model", 1)

        specs = tensor_specs(layout)
        order = module_order(layout)
        params = [n for n, s in specs.items() if s["kind"] == "param"]
        if params:
            for i in range(draw(st.integers(0, 2))):
                source = draw(st.sampled_from(params))
                where = draw(st.sampled_from([p for p in order if p in layout["modules"] or p == "model"]))
                layout["modules"].setdefault(where, [])
                layout["ties"].append({"source": source, "target": f"{where}.t{i}_weight" if where else f"t{i}_weight"})
        non_persistent = [n for n, s in specs.items() if s["kind"] == "buffer" and not s["persistent"]]
        if allow["shared"] and non_persistent:
            source = draw(st.sampled_from(non_persistent))
            later = [p for p in order[order.index(source.rpartition(".")[0]) + 1 :]]
            if later:
                where = draw(st.sampled_from(later))
                layout["modules"].setdefault(where, [])
                layout["shared"].append({"source": source, "alias": f"{where}.s0"})
        droppable = droppable_keys(layout)
        if droppable:
            layout["drop_keys"] = draw(st.lists(st.sampled_from(droppable), max_size=2, unique=True))
        # modules created only to hold a tie target or an alias keep an empty list: drop empty root entries
        for path in ("", "model"):
            if path in layout["modules"] and not layout["modules"][path] and not _holds_extra(layout, path):
                del layout["modules"][path]
        validate(layout)
        return layout

    return draw_layout()


def _holds_extra(layout: dict, path: str) -> bool:
    return any(t["target"].rpartition(".")[0] == path for t in layout["ties"]) or any(
        a["alias"].rpartition(".")[0] == path for a in layout["shared"]
    )


# ---------------------------------------------------------------- smaller layouts


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
        if path in out["modules"] and not out["modules"][path] and not _holds_extra(out, path):
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


# ---------------------------------------------------------------- cases


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


def layout_case(layout: dict) -> Case:
    validate(layout)
    feats = features(layout)
    specs = tensor_specs(layout)
    tags = {GENERATED}
    if any(s["kind"] == "buffer" and s["persistent"] for s in specs.values()):
        tags.add(PERSISTENT_BUFFER)
    forgotten = [s for s in specs.values() if s["kind"] == "buffer" and s["init"] == "forgotten"]
    if forgotten:
        tags.add(FORGOTTEN_BUFFER)
    if any(s["dtype"] == "float32" for s in forgotten):
        tags.add(FORGOTTEN_FLOAT_BUFFER)
    if "shared:non-persistent" in feats:
        tags.add(SHARED_NON_PERSISTENT)
    if _root_recomputed(layout):
        tags.add(ROOT_NON_PERSISTENT)
    if layout["ties"] or layout["tie_embeddings"]:
        tags.add(TIED)
    if layout["drop_keys"]:
        tags.add(DROPPED)
    return Case(
        layout_name(layout),
        f"generated layout ({describe(layout)})",
        partial(GeneratedConfig, layout=layout),
        imports=IMPORTS,
        dtype=layout["dtype"],
        drop_keys=tuple(layout["drop_keys"]),
        tags=frozenset(tags),
    )


def _alternatives(names) -> str:
    return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def _root_recomputed(layout: dict) -> list[str]:
    """Recomputed non-persistent buffers on the top-level model whose value a zeros placeholder cannot fake."""
    return [
        n
        for n, s in tensor_specs(layout).items()
        if "." not in n and s["kind"] == "buffer" and not s["persistent"] and s["init"] == "recomputed"
        and bool(initial_value(n, s).any())
    ]


def stock_issues(layout: dict) -> list:
    """Known upstream issues of the stock stack that this layout must show, as registry entries for it alone.

    The shared registry (fsdp_load_checks.known_issues) selects the zoo's toy cases by name and
    matches their tensor names; these entries are the same upstream bugs selected by what the
    layout holds and matched on exactly the tensors it affects, so a wrong tensor the bug does not
    explain still fails. accelerate-3898 (persistent buffers) needs no entry here: it selects by
    the persistent-buffer tag, which `layout_case` sets. Strict like the registry: an entry whose
    case passes fails, so each is added only where its bug is certain to show.
    """
    from fsdp_load_checks import known_issues as ki

    by_key = {k.key: k for k in ki.KNOWN_ISSUES}
    name = layout_name(layout)
    selects = lambda case: case.name == name  # noqa: E731
    specs = tensor_specs(layout)
    out = []
    forgotten = [n for n, s in specs.items() if s["kind"] == "buffer" and s["init"] == "forgotten"]
    # aliases are the same tensor under another name: forgotten with their source
    forgotten += [a["alias"] for a in layout["shared"] if a["source"] in forgotten]
    if forgotten:
        # the loading rank's copy is uninitialised (NaN / max int / True under poisoning), never the
        # __init__ value (initial_value avoids all of those)
        base = by_key["uninitialised-non-persistent-buffer"]
        names = _alternatives(forgotten)
        floats = _alternatives(n for n in forgotten if specs.get(n, {}).get("dtype") == "float32")
        symptoms = {
            "buffers": rf"^\S+: rank \d+ non-persistent buffer {names} ",
            "forward": r"^\S+: rank \d+ logits differ from the single-process load",
        }
        if any(specs[n]["dtype"] == "float32" for n in forgotten if n in specs):
            symptoms["no-nan"] = rf"^\S+: rank \d+ (non-persistent buffer {floats} has \d+ NaN|logits have \d+ NaN)"
        out.append(ki.KnownIssue(base.key, base.url, base.title, base.package, base.affected, selects, symptoms))
    if layout["shared"]:
        base = by_key["shared-non-persistent-buffer-left-on-meta"]
        out.append(ki.KnownIssue(base.key, base.url, base.title, base.package, base.affected, selects, base.symptoms))
    root = _root_recomputed(layout)
    if root:
        out.append(
            ki.KnownIssue(
                ROOT_BUFFER_ISSUE,
                "https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/modeling_utils.py#L4910",
                "_initialize_missing_keys marks the model itself _is_hf_initialized on ranks 1..N, so _initialize_weights "
                "skips the root module and a non-persistent buffer registered directly on it keeps its zeros placeholder "
                "even when _init_weights recomputes it; fsdp2_prepare_model keeps each rank's own copy (found by the "
                "generated layouts, not yet reported)",
                "transformers",
                ">=5.0.0",
                selects,
                {
                    "buffers": rf"^\S+: rank [1-9]\d* non-persistent buffer {_alternatives(root)} differs from rank 0's",
                    "forward": r"^\S+: rank [1-9]\d* logits differ from the single-process load",
                },
            )
        )
    return out


ROOT_BUFFER_ISSUE = "root-non-persistent-buffer-not-recomputed"


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


def __getattr__(name: str):
    # `CASES` is read on every all_cases(): computed from the file the environment names right now
    if name == "CASES":
        return env_cases()
    raise AttributeError(name)
