"""What a case is: a recipe for a checkpoint, looked up by name in every process."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# Tags a known issue can select cases by (fsdp_load_checks/known_issues.py). A tag that names a
# kind of tensor may come with the names of those tensors in `Case.tensors`, so an issue's symptom
# can match exactly the tensors the bug affects in that case.
PERSISTENT_BUFFER = "persistent-buffer"  # the model holds a persistent buffer (accelerate 3898)
BIG = "big"  # hundreds of MiB: the size class the memory check can judge
FORGOTTEN_BUFFER = "forgotten-non-persistent-buffer"  # a non-persistent buffer _init_weights does not recompute
FORGOTTEN_FLOAT_BUFFER = "forgotten-float-non-persistent-buffer"  # ... a floating one (poisoned: NaN)
SHARED_NON_PERSISTENT = "shared-non-persistent-buffer"  # one non-persistent tensor under two module names
ROOT_NON_PERSISTENT = "root-non-persistent-buffer"  # a recomputed non-persistent buffer on the top-level model
# ... whose wrong value leaves the checks' forward output unchanged (read, but through a zero-initialised weight)
ROOT_NON_PERSISTENT_OUTPUT_UNCHANGED = "root-non-persistent-buffer-output-unchanged"
# ... which the checks' forward does not read at all: output and training unchanged (tag OUTPUT_UNCHANGED too)
ROOT_NON_PERSISTENT_UNREAD = "root-non-persistent-buffer-unread"
USER = "user"  # a user's checkpoint directory
MIXED_PRECISION = "mixed-precision"  # the case runs under a mixed-precision accelerate config (Case.under)
TIED = "tied-parameters"  # the plain load ties parameters (one tensor under several names); tensors: those names
# a parameter tied beyond the input/output embedding pair (T5's encoder/decoder embed_tokens, BERT-MLM's decoder
# bias); tensors: the name torch's FSDP2 error gives it ("None" when torch finds none)
TIED_BEYOND_EMBEDDINGS = "tied-beyond-embeddings"
# transformers converts the checkpoint's tensors into the model's on load (core_model_loading.WeightConverter: a
# MoE's experts saved one tensor per expert, stacked into 3-D parameters)
CONVERTED_ON_LOAD = "converted-on-load"
# parameters (untied) the checkpoint lacks: ranks 1..N keep them on meta (transformers 5.x); tensors: those names
MISSING_PARAMETERS = "missing-parameters"


@dataclass(frozen=True)
class Case:
    """A checkpoint recipe: a config built in code, a seed, a dtype, edits to the saved file.

    Only the name crosses process boundaries; every process rebuilds the
    catalogue and finds the case by name (fsdp_load_checks/catalogue.py).
    """

    name: str
    guards: str  # one line: the bug this case would catch
    config: Callable[[], object]  # returns a transformers PretrainedConfig
    imports: tuple[str, ...] = ()  # modules that register the architecture (toy models)
    dtype: str = "float32"
    seed: int = 0
    drop_keys: tuple[str, ...] = ()  # checkpoint keys removed after saving (missing on load)
    extra_keys: tuple[str, ...] = ()  # keys added to the checkpoint (unexpected on load)
    tags: frozenset[str] = field(default_factory=frozenset)
    # tag -> names of the tensors it is about (e.g. FORGOTTEN_BUFFER -> the forgotten buffers' names)
    tensors: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False, compare=False)
    fault: str | None = None  # harness self-tests: a fault to inject into one rank (fsdp_load_checks/rank/faults.py)
    checkpoint: str | None = None  # a user's checkpoint directory (`fsdp-load-checks check PATH`): nothing is built
    # the class every process loads it with (and builds it from, unless `checkpoint_class`), by name (fsdp_load_checks/model_class.py): an Auto class
    # (`AutoModel`) or a model class (`BertModel`); the name, since this layer never imports transformers
    model_class: str = "AutoModelForCausalLM"
    # the class the checkpoint is built and saved from, when it is not `model_class`: a head loaded on a checkpoint
    # saved without it (a classifier on a base model or a causal LM), as fine-tuning scripts do
    checkpoint_class: str | None = None
    # the accelerate config this case runs under (a shipped name or a path); None: the run's --accelerate-config
    accelerate_config: str | None = None
    checkpoint_of: str | None = None  # the case whose checkpoint this one loads (a variant shares it)
    # False: the after-loading steps (state dict, sharded round trip, train step, save) are not run, and the
    # state-dict and train-step checks report "skipped": a big-* case exists for the memory check, and its toy twin
    # (llama-rope, arch-qwen3-moe, ...) runs them on the same code path for a fraction of the time
    after_loading: bool = True
    # the loader this case runs under when it is not the run's (`--loader`): the detection batch runs each re-created
    # regression on its own cases beside the fixed loader's, in one launch (fsdp_load_checks/detection.py)
    loader: str | None = None
    poison: bool = False  # NaN-fill uninitialised memory on every rank for this case (--poison-uninitialized)
    reference_of: str | None = None  # the case whose plain load this one is judged against (a loader variant's)

    @property
    def checkpoint_name(self) -> str:
        """The name its checkpoint is built and stored under (shared by a case and its variants)."""
        return self.checkpoint_of or self.name

    @property
    def reference_name(self) -> str:
        """The name its plain-load observation is made and stored under (shared with its loader variants)."""
        return self.reference_of or self.name

    def under(self, accelerate_config: str, suffix: str, *tags: str) -> Case:
        """This case under another accelerate config, as `<name>@<suffix>`, loading the same checkpoint."""
        return dataclasses.replace(
            self, name=f"{self.name}@{suffix}", accelerate_config=accelerate_config,
            checkpoint_of=self.checkpoint_name, tags=self.tags | frozenset(tags),
        )

    def with_loader(self, loader: str, poison: bool = False) -> Case:
        """This case under another loader, as `<name>~<loader>`: the same checkpoint and the same plain load
        (a loader changes only what the ranks do), so one launch can hold several loaders."""
        return dataclasses.replace(
            self, name=f"{self.name}~{loader}", loader=loader, poison=poison,
            checkpoint_of=self.checkpoint_name, reference_of=self.reference_name,
        )

    def with_tags(self, *tags: str, tensors: Mapping[str, tuple[str, ...]] | None = None) -> Case:
        """This case with more tags; `tensors` maps a tag (added too) to the names of the tensors it is about."""
        named = {tag: tuple(names) for tag, names in (tensors or {}).items()}
        return dataclasses.replace(
            self, tags=self.tags | frozenset(tags) | frozenset(named), tensors={**self.tensors, **named}
        )
