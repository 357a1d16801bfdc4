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
      "shared": [{"source": "model.m0.b1", "alias": "model.m1.s0"}],  # one tensor under two modules
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
SHARED_PERSISTENT = "shared-persistent-buffer"
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
        out.add("shared:persistent" if specs[a["source"]]["persistent"] else "shared:non-persistent")
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
    """A fixed (numel, hidden) float32 matrix keyed by the tensor's name: how it enters the hidden state."""
    k = _key(name)
    j = torch.arange(numel, dtype=torch.float64)[:, None]
    h = torch.arange(hidden, dtype=torch.float64)[None, :]
    m = torch.cos(j * (0.61 + (k % 89) / 97.0) + h * (1.37 + (k % 53) / 61.0) + (k % 31) / 7.0)
    return (m / math.sqrt(numel)).to(torch.float32)


def contribution(name: str, tensor: torch.Tensor, hidden: int, scale: float) -> torch.Tensor:
    flat = tensor.reshape(-1).float() / scale
    return flat @ mixing(name, flat.numel(), hidden).to(flat.device)


def value_scale(spec: dict) -> float:
    """Typical magnitude of a tensor's values, so every tensor moves the logits about as much."""
    if spec["kind"] == "param":
        return PARAM_STD
    return {"float32": 0.5, "int64": 4.0, "bool": 0.5}[spec["dtype"]]


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
        h = h + contribution(full, getattr(module, local), h.shape[-1], value_scale(spec))
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
    if "shared:persistent" in feats:
        tags.add(SHARED_PERSISTENT)
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
