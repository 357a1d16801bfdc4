"""Which class a checkpoint loads with: the one its config.json names, or the one the user asks for.

A user loads a checkpoint with a class (`LlamaForCausalLM`, `AutoModel`,
`BertForSequenceClassification`, ...) and gets that class's tensors and
outputs: a base model has no head, a classifier another one. The suite loads
with the same class everywhere it loads (the checkpoint builder, the
reference process, every rank), so only its name travels between processes
(`records.Case.model_class`, `records.RankTask.model_class`).

A name resolves, in this order, to
- an Auto class of transformers (`AutoModelForCausalLM`, `AutoModel`, ...):
  `from_pretrained` then picks the concrete class by the config's type;
- a model class transformers exports (`LlamaModel`, `BertModel`);
- a class registered with an Auto mapping by an imported module (custom
  code loaded with `--import`: `AutoModelForCausalLM.register(Config, Class)`).

No transformers import at module level: ranks import this before they
start their memory sampler.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

CAUSAL_LM = "AutoModelForCausalLM"  # the zoo's default and the fallback for a config that names no class


class UnknownModelClass(ValueError):
    """A class name that resolves to no model class; the message is one line naming the fix."""


def is_auto(cls: type) -> bool:
    """An Auto class (`from_pretrained` dispatches on the config's type), not a concrete model class."""
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    return isinstance(cls, type) and issubclass(cls, _BaseAutoModelClass)


def _registered(name: str) -> type | None:
    """A class some imported module registered with an Auto mapping (custom code), by class name."""
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.auto_factory import _LazyAutoMapping

    for mapping in vars(modeling_auto).values():
        if isinstance(mapping, _LazyAutoMapping):
            for value in mapping._extra_content.values():
                for cls in value if isinstance(value, (list, tuple)) else (value,):
                    if getattr(cls, "__name__", None) == name:
                        return cls
    return None


@functools.cache
def _transformers_names() -> frozenset[str]:
    """Every public name of transformers: its lazy module lists them (`__all__`) without importing them, and the
    ones imported so far are attributes. What `dir(transformers)` gives, without its quadratic merge of the two
    lists (0.45 s per process on transformers 5.24: every rank and reference process paid it)."""
    import transformers

    return frozenset(vars(transformers)) | frozenset(getattr(transformers, "__all__", ()))


def resolve(name: str) -> type:
    """The class called `name` (Auto class, transformers model class, or one registered by an import).

    Resolving a transformers model class imports its modeling module (the
    lazy import the first `from_pretrained` would otherwise pay).
    Raises UnknownModelClass when nothing by that name is a model class.
    """
    import transformers
    from transformers import PreTrainedModel

    cls = None
    if name.isidentifier() and name in _transformers_names():
        try:
            cls = getattr(transformers, name)
        except (AttributeError, ImportError):  # a name whose backend is not installed
            cls = None
    if not (isinstance(cls, type) and (is_auto(cls) or issubclass(cls, PreTrainedModel))):
        cls = _registered(name)
    if cls is None:
        raise UnknownModelClass(
            f"model class {name!r} is neither an Auto class nor a model class of transformers "
            f"{transformers.__version__}, nor registered by an imported module; pass --model-class with an Auto "
            f"class (AutoModel, AutoModelForCausalLM, ...) or a class name, or --import the module that registers it"
        )
    return cls


def concrete(cls: type, config) -> type:
    """The class `cls.from_pretrained` instantiates for `config` (itself unless `cls` is an Auto class).

    For an Auto class this imports the concrete class's modeling module.
    Raises UnknownModelClass when the Auto class has no class for this config's type.
    """
    if not is_auto(cls):
        return cls
    from transformers.models.auto.auto_factory import _get_model_class

    try:
        return _get_model_class(config, cls._model_mapping)
    except KeyError:
        import transformers

        raise UnknownModelClass(
            f"{cls.__name__} has no class for model type {config.model_type!r} in transformers "
            f"{transformers.__version__}; pass --model-class with a class that loads it"
        ) from None


def read_config(checkpoint: str | Path):
    """The checkpoint's config (AutoConfig), read with transformers' warnings silenced.

    Config validation logs a line per odd field (special token ids outside
    the vocabulary, ...); reading the config to check input must not turn a
    one-line error into three. `from_pretrained` itself still logs them.
    Raises what AutoConfig.from_pretrained raises (ValueError, KeyError, OSError).
    """
    from transformers import AutoConfig
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return AutoConfig.from_pretrained(checkpoint)
    finally:
        logging.set_verbosity(verbosity)


def from_config(name: str, config, dtype=None):
    """A freshly initialised model of class `name` built from `config` (the checkpoint builder's model; a rank's
    fresh model for the sharded round trip), in `dtype` when given (else the config's default)."""
    cls = resolve(name)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return cls.from_config(config, **kwargs) if is_auto(cls) else cls._from_config(config, **kwargs)


def loadable(name: str, checkpoint: str | Path) -> type:
    """The class to call `from_pretrained` on for this checkpoint, with its modeling code already imported.

    Called before a rank's memory baseline: the first `from_pretrained` of an
    architecture imports its modeling module lazily (35-80 MiB of anonymous
    memory), which is not the loader's cost.
    """
    cls = resolve(name)
    if is_auto(cls):
        concrete(cls, read_config(checkpoint))
    return cls


def named_in(checkpoint: str | Path, override: str | None = None) -> str:
    """The class name a user's checkpoint loads with: `override` if given, else config.json's `architectures[0]`.

    A config that names no architecture falls back to AutoModelForCausalLM,
    the class every checkpoint loaded with before classes were read. The name
    is checked here, in the parent, so a bad one is one line before any
    rank starts. Raises UnknownModelClass.
    """
    raw = json.loads((Path(checkpoint) / "config.json").read_text())
    architectures = raw.get("architectures") or []
    name = override or (architectures[0] if architectures else CAUSAL_LM)
    try:
        cls = resolve(name)
    except UnknownModelClass as exc:
        if override:
            raise
        raise UnknownModelClass(
            f"{checkpoint}: config.json names architecture {name!r}, which the installed transformers does not "
            "have; --import the module that registers it, or pass --model-class NAME"
        ) from exc
    if is_auto(cls):
        concrete(cls, read_config(checkpoint))
    return name
