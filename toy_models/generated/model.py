"""The model a layout describes: a real `PreTrainedModel`, registered with the Auto classes on import.

Every parameter and every buffer (any dtype) feeds the logits through a
fixed, name-keyed linear map, so a wrong value on any rank changes the
forward check as well as the tensor checks.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutput

from toy_models.generated.layout import children, example_layout, tensor_specs

MODEL_TYPE = "fsdp-generated"
PARAM_STD = 0.5  # _init_weights draws parameters from N(0, PARAM_STD)


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


class GeneratedModule(nn.Module):
    def __init__(self, path: str, layout: dict, made: dict[str, torch.Tensor]):
        super().__init__()
        self._layout = layout
        _register(self, path, layout, made)
        for child in children(path, layout):
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


class GeneratedModel(GeneratedPreTrainedModel):
    def __init__(self, config: GeneratedConfig, made: dict | None = None):
        super().__init__(config)
        layout = config.layout
        made = {} if made is None else made
        self._layout = layout
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        _register(self, "model", layout, made)
        for child in children("model", layout):
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
