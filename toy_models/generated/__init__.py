"""Generated model layouts: a random module tree becomes a real `PreTrainedModel` and a case.

  layout.py    the layout (plain JSON): schema, validation, what it exercises
  model.py     the PreTrainedModel a layout describes (registered with the Auto classes on import)
  strategy.py  the hypothesis strategy that draws layouts
  shrink.py    one-step-simpler layouts, for prefetching shrink candidates
  cases.py     layouts as cases, and the layouts file every process reads

Importing the package registers the architecture (ranks import
"toy_models.generated" before loading a generated checkpoint).
`toy_models.generated.CASES` is the layouts file's cases, read on access.
"""

from toy_models.generated.cases import (
    DROPPED,
    GENERATED,
    IMPORTS,
    LAYOUTS_ENV,
    TIED,
    env_cases,
    layout_case,
    read_layouts,
    root_recomputed,
    write_layouts,
)
from toy_models.generated.layout import (
    BUFFER_DTYPES,
    canonical,
    checkpoint_keys,
    describe,
    droppable_keys,
    example_layout,
    features,
    layout_name,
    module_order,
    tensor_specs,
    validate,
)
from toy_models.generated.model import (
    MODEL_TYPE,
    GeneratedConfig,
    GeneratedForCausalLM,
    initial_value,
)
from toy_models.generated.shrink import renumber, simplifications
from toy_models.generated.strategy import layouts

__all__ = [
    "BUFFER_DTYPES", "DROPPED", "GENERATED", "IMPORTS", "LAYOUTS_ENV", "MODEL_TYPE", "TIED", "GeneratedConfig",
    "GeneratedForCausalLM", "canonical", "checkpoint_keys", "describe", "droppable_keys", "env_cases",
    "example_layout", "features", "initial_value", "layout_case", "layout_name", "layouts", "module_order",
    "read_layouts", "renumber", "root_recomputed", "simplifications", "tensor_specs", "validate", "write_layouts",
]  # fmt: skip


def __getattr__(name: str):
    # `CASES` is read on every all_cases(): computed from the file the environment names right now
    if name == "CASES":
        return env_cases()
    raise AttributeError(name)
