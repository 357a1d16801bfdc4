"""Upstream bugs that are real today, matched by their exact symptom and version range.

An entry turns a failing (case, check) into an expected failure only when
every problem of that check matches one of its symptoms, field by field
(kind of problem, exception type and message, tensor name, rank, a numeric
range: `records.Symptom`), so a second bug in the same case still fails.
It is strict: when an affected case passes, the entry is stale (upstream
fixed it) and the suite fails to say so.

Entries select cases by tag where they can (`records.case`), so the zoo's
toy cases, the real architectures and generated layouts share one entry per
bug; a tag's `Case.tensors` names exactly the tensors the bug affects there.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from packaging.specifiers import SpecifierSet

from fsdp_load_checks.checks import CHECKS
from fsdp_load_checks.observe import stack_versions
from fsdp_load_checks.records import (
    Against,
    Case,
    CaseResult,
    KnownIssue,
    Outcome,
    Phase,
    Problem,
    ProblemKind,
    Quantity,
    Status,
    Symptom,
    Verdict,
)
from fsdp_load_checks.records.case import (
    BIG,
    CONVERTED_ON_LOAD,
    FORGOTTEN_BUFFER,
    FORGOTTEN_FLOAT_BUFFER,
    MISSING_PARAMETERS,
    MIXED_PRECISION,
    PERSISTENT_BUFFER,
    ROOT_NON_PERSISTENT,
    ROOT_NON_PERSISTENT_OUTPUT_UNCHANGED as ROOT_OUTPUT_UNCHANGED,
    ROOT_NON_PERSISTENT_UNREAD as ROOT_UNREAD,
    SHARED_NON_PERSISTENT,
    TIED,
    TIED_BEYOND_EMBEDDINGS,
)

ALL_CHECKS = tuple(CHECKS)
HALF_DTYPES = ("bfloat16", "float16")


def applies(issue: KnownIssue, case: Case, check: str, versions: dict[str, str], loader: str = "stock") -> bool:
    """The issue is registered for this case and check on the installed stack (its symptom must show)."""
    if loader not in issue.loaders:
        return False
    installed = versions.get(issue.package)
    if not installed or installed == "absent" or check not in issue.symptoms:
        return False
    if not any(_applicable(s, case) for s in issue.symptoms[check]):
        return False
    if not SpecifierSet(issue.affected).contains(installed, prereleases=True):
        return False
    for package, spec in issue.also.items():
        other = versions.get(package)
        if not other or other == "absent" or not SpecifierSet(spec).contains(other, prereleases=True):
            return False
    return issue.selects(case)


def _applicable(symptom: Symptom, case: Case) -> bool:
    return (symptom.when_tagged is None or symptom.when_tagged in case.tags) and (
        symptom.unless_tagged is None or symptom.unless_tagged not in case.tags)


def matches(symptom: Symptom, problem: Problem, case: Case) -> bool:
    """Every field the symptom sets agrees with the problem."""
    s, p = symptom, problem
    if not _applicable(s, case):
        return False
    if s.kinds and p.kind not in s.kinds:
        return False
    if s.quantities and p.quantity not in s.quantities:
        return False
    if s.got is not None and (p.got is None or not re.fullmatch(s.got, p.got)):
        return False
    if s.want is not None and (p.want is None or not re.fullmatch(s.want, p.want)):
        return False
    if s.tensor is not None and not re.fullmatch(s.tensor, p.tensor):
        return False
    if s.tagged is not None and p.tensor not in case.tensors.get(s.tagged, ()):
        return False
    if s.against is not None and p.against != s.against:
        return False
    if p.rank is None or p.rank < s.min_rank:
        return False
    if s.exc_type is not None or s.message is not None:
        if p.failure is None or p.kind != ProblemKind.RAISED:
            return False
        if (s.exc_type is not None and p.failure.exc_type != s.exc_type) or (
            s.message is not None and p.failure.message != s.message
        ):
            return False
    if s.phase is not None:
        where = p.failure.phase if p.failure else p.memory.phase if p.memory else p.phase
        if where != s.phase:
            return False
    if s.loading is not None or s.multiple is not None:
        if p.memory is None:
            return False
        if s.loading is not None and p.memory.loading != s.loading:
            return False
        if s.multiple is not None and not s.multiple[0] <= p.memory.multiple < s.multiple[1]:
            return False
    return True


def explains(issue: KnownIssue, problem: Problem, case: Case) -> bool:
    return any(matches(s, problem, case) for s in issue.symptoms.get(problem.check, ()))


def _tagged(tag: str) -> Callable[[Case], bool]:
    return lambda case: tag in case.tags


def _named(*names: str) -> Callable[[Case], bool]:
    return lambda case: case.name in names


MODELING_UTILS = "https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/modeling_utils.py"
# a rank that raised during FSDP2 preparation, with exactly this exception
PERSISTENT_BUFFER_CRASH = Symptom(
    kinds=frozenset({ProblemKind.RAISED}),
    exc_type="AttributeError",
    message="'Tensor' object has no attribute 'device_mesh'",
    phase=Phase.FSDP2_PREPARE,
)
SHARED_BUFFER_CRASH = Symptom(
    kinds=frozenset({ProblemKind.RAISED}),
    exc_type="NotImplementedError",
    message="Cannot copy out of meta tensor; no data!",
    phase=Phase.FSDP2_PREPARE,
)
NAN_LOGITS = Symptom(kinds=frozenset({ProblemKind.NON_FINITE}), tensor="logits")
WRONG_LOGITS = Symptom(kinds=frozenset({ProblemKind.LOGITS}))
# A rank that only receives rank 0's weights committing about the whole model (0.9x-1.5x) while loading:
# the non-rank-0 branch wrote into every parameter and buffer. Multiples above 1.5x are another bug.
WHOLE_MODEL_ON_A_RECEIVING_RANK = Symptom(
    kinds=frozenset({ProblemKind.MEMORY}), phase=Phase.FROM_PRETRAINED, loading=False, multiple=(0.9, 1.5)
)
# A rank that only receives stacking a MoE's experts from the checkpoint's per-expert tensors: the experts' bytes
# (big-qwen3-moe, experts 85% of the model: 0.94x on 5.24.0 and 5.5.4)
CONVERTED_WEIGHTS_ON_A_RECEIVING_RANK = Symptom(
    kinds=frozenset({ProblemKind.MEMORY}), phase=Phase.FROM_PRETRAINED, loading=False, multiple=(0.7, 1.2)
)
# ... on top of the zeros_like era's whole-model placeholders: both (big-qwen3-moe on 5.6.0: 1.79-1.81x)
WHOLE_MODEL_AND_CONVERTED_WEIGHTS = Symptom(
    kinds=frozenset({ProblemKind.MEMORY}), phase=Phase.FROM_PRETRAINED, loading=False, multiple=(1.6, 2.3),
    when_tagged=CONVERTED_ON_LOAD,
)
# Under mixed precision, a rank that only receives committing an fp32 copy of a 16-bit model on top of its shard
# during preparation: 2x the model's bytes for the copy + 0.5-1x for its shard and one tensor in flight.
FP32_COPY_ON_A_RECEIVING_RANK = Symptom(
    kinds=frozenset({ProblemKind.MEMORY}), phase=Phase.FSDP2_PREPARE, loading=False, multiple=(2.0, 4.0)
)
# every rank, before loading: the efficient path is not switched on (rank/case.assert_path_under_test)
TRAINER_WIRING_PATH_NOT_TAKEN = Symptom(
    kinds=frozenset({ProblemKind.RAISED}),
    exc_type="PathNotExercised",
    message=(
        "transformers does not see FSDP with cpu_ram_efficient_loading (is_fsdp_enabled() is False; "
        "ACCELERATE_USE_FSDP=None, FSDP_CPU_RAM_EFFICIENT_LOADING='true'): every rank would load the whole "
        "checkpoint itself"
    ),
    phase=Phase.FROM_PRETRAINED,
)
RECURRENT_GEMMA_ROPE = r"model\.layers\.\d+\.temporal_block\.rotary_emb\.(original_)?inv_freq"
# A training step on a rank whose buffer is wrong: its loss differs, and since FSDP2 averages the ranks'
# gradients, every rank's gradients and stepped parameters differ (rank 0's too).
TRAINED_WITH_A_WRONG_BUFFER = (
    Symptom(kinds=frozenset({ProblemKind.LOSS})),
    Symptom(kinds=frozenset({ProblemKind.VALUES}), quantities=frozenset({Quantity.GRADIENT, Quantity.STEPPED})),
)

# Version ranges are exact: entries are strict, so a release inside a range where the bug is absent fails
# as stale, and a release outside it fails on the symptom. Eras of the non-rank-0 branch of
# PreTrainedModel._move_missing_keys_from_meta_to_device (read from each release's modeling_utils.py;
# docs/version-matrix.md has the matrix and the tox envs that check it):
#   5.0.0 - 5.3.0   torch.empty_like for every param and buffer, nothing marked initialised: rank 1
#                   re-initialises the whole model (initialize_weights) -> commits it (reinit-era-memory)
#   5.4.0 - 5.5.4   torch.empty_like, state-dict entries marked initialised: nothing committed; a buffer
#                   _init_weights does not recompute is garbage on ranks 1..N (uninitialised-non-persistent-buffer)
#   5.6.0 - 5.22.2  torch.zeros_like for every param and buffer (PR 45050): every rank 1..N commits the
#                   whole model (zeros-like-era-memory); a forgotten buffer is zeros on ranks 1..N
#   5.23.0 -        zeros_like placeholders for non-persistent buffers only

KNOWN_ISSUES = [
    KnownIssue(
        key="accelerate-3898",
        url="https://github.com/huggingface/accelerate/issues/3898",
        title="fsdp2_load_full_state_dict reads .device_mesh of every state-dict entry; persistent buffers are plain tensors",
        package="accelerate",
        affected=">=1.10.0",  # no fixed release yet (fix PRs 3921 and 4023 closed unmerged)
        selects=_tagged(PERSISTENT_BUFFER),
        symptoms=dict.fromkeys(ALL_CHECKS, (PERSISTENT_BUFFER_CRASH,)),
    ),
    KnownIssue(
        key="uninitialised-non-persistent-buffer",
        url=MODELING_UTILS + "#L4842",
        title=(
            "transformers 5 builds models on meta and restores non-persistent buffers only through _init_weights: "
            "one it does not recompute is left uninitialised (torch.empty_like) on the loading rank and in any plain "
            "load, and as a zeros placeholder on ranks 1..N, which fsdp2_prepare_model keeps (it re-registers each "
            "rank's own copy, never rank 0's)"
        ),
        package="transformers",
        affected=">=5.0.0",
        selects=_tagged(FORGOTTEN_BUFFER),
        loaders=("stock", "native-fsdp"),  # transformers' own FSDP loading restores them the same way
        symptoms={
            # the loading rank's copy is uninitialised: NaN under poisoning, for a floating buffer
            "no-nan": (
                Symptom(kinds=frozenset({ProblemKind.NON_FINITE}), tagged=FORGOTTEN_FLOAT_BUFFER,
                        when_tagged=FORGOTTEN_FLOAT_BUFFER),
                Symptom(kinds=frozenset({ProblemKind.NON_FINITE}), tensor="logits", when_tagged=FORGOTTEN_FLOAT_BUFFER),
            ),
            "buffers": (Symptom(tagged=FORGOTTEN_BUFFER),),
            "forward": (WRONG_LOGITS,),
            "train-step": TRAINED_WITH_A_WRONG_BUFFER,
        },
    ),
    KnownIssue(
        key="shared-non-persistent-buffer-left-on-meta",
        url=MODELING_UTILS + "#L4880",
        title=(
            "_move_missing_keys_from_meta_to_device walks named_non_persistent_buffers() with duplicates removed, so "
            "a buffer registered under two modules is materialised under its first name only and stays on meta "
            "under the other; fsdp2_prepare_model then fails copying it (found by this suite, not yet reported)"
        ),
        package="transformers",
        affected=">=5.0.0",
        selects=_tagged(SHARED_NON_PERSISTENT),
        symptoms=dict.fromkeys(ALL_CHECKS, (SHARED_BUFFER_CRASH,)),
    ),
    KnownIssue(
        key="root-non-persistent-buffer-not-recomputed",
        url=MODELING_UTILS + "#L4910",
        title=(
            "transformers 5.4.0+: _initialize_missing_keys marks the model itself _is_hf_initialized on ranks 1..N, so "
            "_initialize_weights skips the root module and a non-persistent buffer registered directly on it keeps its "
            "zeros placeholder even when _init_weights recomputes it; fsdp2_prepare_model keeps each rank's own copy. "
            "Real base models loaded with AutoModel have such branches (a static scan of 5.24.0 finds 12 base classes, "
            "CTRLModel pos_encoding and OpenAIGPTModel position_ids among them); 5.0.0-5.3.0 re-initialised the whole "
            "model there, root included (found by the generated layouts, not yet reported)"
        ),
        package="transformers",
        affected=">=5.4.0",  # 5.3.0's _initialize_missing_keys has no FSDP branch; 5.4.0 added it (line 4563)
        selects=_tagged(ROOT_NON_PERSISTENT),
        symptoms={
            "buffers": (
                Symptom(kinds=frozenset({ProblemKind.VALUES}), tagged=ROOT_NON_PERSISTENT, against=Against.RANK0,
                        min_rank=1),
            ),
            # a buffer the forward does not read (GPT-BigCode's causal mask) leaves the output and training intact;
            # Gemma3n's per-layer input scales reach the output through a zero-initialised altup correction: only
            # its gradients differ
            "forward": (Symptom(kinds=frozenset({ProblemKind.LOGITS}), min_rank=1, unless_tagged=ROOT_OUTPUT_UNCHANGED),),
            # only ranks 1..N compute with the wrong buffer; the averaged gradients are wrong everywhere
            "train-step": tuple(
                dataclasses.replace(s, unless_tagged=ROOT_UNREAD)
                for s in (Symptom(kinds=frozenset({ProblemKind.LOSS}), min_rank=1), TRAINED_WITH_A_WRONG_BUFFER[1])
            ),
        },
    ),
    KnownIssue(
        key="recurrent-gemma-rope-not-in-init-weights",
        url=(
            "https://github.com/huggingface/transformers/blob/v5.3.0/src/transformers/models/recurrent_gemma/"
            "modeling_recurrent_gemma.py#L566"
        ),
        title=(
            "transformers 5.0.0-5.3.0: RecurrentGemmaPreTrainedModel._init_weights does not recompute "
            "RecurrentGemmaRotaryEmbedding's inv_freq/original_inv_freq, so the attention layer's RoPE buffers are "
            "left uninitialised (torch.empty_like) on every rank and in a plain load; 5.4.0 added the branch"
        ),
        package="transformers",
        affected=">=5.0.0,<5.4.0",
        selects=_named("arch-recurrent-gemma"),
        symptoms={
            "no-nan": (Symptom(kinds=frozenset({ProblemKind.NON_FINITE}), tensor=RECURRENT_GEMMA_ROPE), NAN_LOGITS),
            "buffers": (Symptom(kinds=frozenset({ProblemKind.VALUES}), tensor=RECURRENT_GEMMA_ROPE),),
            "forward": (WRONG_LOGITS,),
            "train-step": TRAINED_WITH_A_WRONG_BUFFER,
        },
    ),
    KnownIssue(
        key="converted-weights-on-receiving-ranks",
        url="https://github.com/huggingface/transformers/issues/43749",
        title=(
            "transformers 5.x converts the checkpoint's tensors into the model's layout on every rank "
            "(core_model_loading.WeightConverter: a MoE's per-expert weights stacked into 3-D parameters), also on "
            "ranks 1..N whose values the broadcast replaces: a rank that only receives commits the converted weights' "
            "bytes during from_pretrained (Qwen3-30B-A3B, transformers issue 43749; fixed loader: T5)"
        ),
        package="transformers",
        affected=">=5.0.0",  # the converters came with 5.0; 5.6-5.22's zeros_like placeholders add the whole model
        selects=_tagged(CONVERTED_ON_LOAD),
        symptoms={"memory": (CONVERTED_WEIGHTS_ON_A_RECEIVING_RANK,)},
    ),
    KnownIssue(
        key="zeros-like-era-memory",
        url="https://github.com/huggingface/transformers/pull/45649",
        title=(
            "transformers 5.6.0-5.22.2 (PR 45050, 'fix NaN weights'): ranks 1..N give every parameter and buffer a "
            "torch.zeros_like placeholder in _move_missing_keys_from_meta_to_device; zero-filling commits every page, "
            "so each rank that only receives commits the whole model during from_pretrained (Qwen3-30B-A3B, 8 ranks "
            "a node: host peak ~60 GB -> ~480 GB, OOM; bisected in PR 45649, fixed in 5.23.0)"
        ),
        package="transformers",
        affected=">=5.6.0,<5.23.0",
        selects=_tagged(BIG),
        symptoms={"memory": (WHOLE_MODEL_ON_A_RECEIVING_RANK, WHOLE_MODEL_AND_CONVERTED_WEIGHTS)},
    ),
    KnownIssue(
        key="mixed-precision-upcast-on-receiving-ranks",
        url="https://github.com/huggingface/accelerate/blob/v1.15.0/src/accelerate/utils/fsdp_utils.py#L813",
        title=(
            "accelerate 1.14+: with mixed_precision other than 'no', fsdp2_prepare_model upcasts every trainable "
            "parameter to fp32 (param.data.to(torch.float32)) on every rank before moving the model to meta; on a "
            "rank that only receives, that copies the memory-mapped 16-bit weights into a full fp32 model that the "
            "broadcast then throws away (TRL's FSDP2 config sets bf16 with cpu_ram_efficient_loading; found by this "
            "suite, not yet reported)"
        ),
        package="accelerate",
        affected=">=1.14.0",
        selects=lambda case: BIG in case.tags and MIXED_PRECISION in case.tags and case.dtype in HALF_DTYPES,
        symptoms={"memory": (FP32_COPY_ON_A_RECEIVING_RANK,)},
    ),
    KnownIssue(
        key="missing-parameters-collide-in-optimizer-mapping",
        url="https://github.com/huggingface/accelerate/blob/v1.15.0/src/accelerate/accelerator.py",
        title=(
            "ranks 1..N keep the parameters a checkpoint lacks on meta (transformers' "
            "_move_missing_keys_from_meta_to_device returns early there), where every one has data_ptr() 0; "
            "accelerate's _prepare_fsdp2 maps optimizer parameters to the sharded ones by data_ptr(), so with two "
            "or more such parameters the map collides: a receiving rank's optimizer holds one of them twice (stepped "
            "twice) and the others not at all (e.g. a classifier's weight and bias on a base checkpoint)"
        ),
        package="accelerate",
        affected=">=1.10.0",
        also={"transformers": ">=5.23.0"},
        selects=lambda case: len(case.tensors.get(MISSING_PARAMETERS, ())) >= 2,
        symptoms={
            "train-step": (
                Symptom(kinds=frozenset({ProblemKind.MISSING}), quantities=frozenset({Quantity.MASTER}), min_rank=1,
                        tagged=MISSING_PARAMETERS),
                Symptom(kinds=frozenset({ProblemKind.VALUES}), quantities=frozenset({Quantity.STEPPED}),
                        tagged=MISSING_PARAMETERS),
            ),
        },
    ),
    KnownIssue(
        key="save-pretrained-writes-gathered-tie-twice",
        url="https://github.com/huggingface/transformers/issues/48972",
        title=(
            "save_pretrained(state_dict=...) drops a tied key only when the state dict's tensors share storage "
            "(remove_tied_weights_from_state_dict); accelerate's FSDP2 get_state_dict (torch get_model_state_dict, "
            "full) gathers each key into its own tensor, so the tied output head is written a second time, as a "
            "key the plain save does not have (loads back equal; the file carries the embedding twice)"
        ),
        package="transformers",
        affected=">=5.0.0",
        selects=_tagged(TIED),
        symptoms={
            "state-dict": (
                Symptom(kinds=frozenset({ProblemKind.TIED_COPY}), quantities=frozenset({Quantity.SAVED}), tagged=TIED),
            ),
        },
    ),
    KnownIssue(
        key="mixed-precision-state-dict-in-fp32",
        url="https://github.com/huggingface/transformers/issues/33780",
        title=(
            "accelerate 1.14+: under mixed precision fsdp2_prepare_model upcasts a 16-bit model's trainable "
            "parameters to fp32 master weights, and get_state_dict returns those: the full state dict, a sharded "
            "checkpoint loaded back, and the save_pretrained file of a bf16-loaded model are fp32, twice the "
            "checkpoint, while config.json still says bfloat16 (accelerate's own log line warns of it; 1.13 kept "
            "bf16 only because its upcast was a no-op, issue 3979)"
        ),
        package="accelerate",
        affected=">=1.14.0",
        selects=lambda case: MIXED_PRECISION in case.tags and case.dtype in HALF_DTYPES,
        symptoms={
            "state-dict": (
                Symptom(kinds=frozenset({ProblemKind.DTYPE}),
                        quantities=frozenset({Quantity.GATHERED, Quantity.ROUND_TRIP, Quantity.SAVED}),
                        got="float32", want="|".join(HALF_DTYPES)),
            ),
        },
    ),
    KnownIssue(
        key="training-arguments-no-accelerate-use-fsdp",
        url="https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/training_args.py#L2850",
        title=(
            "transformers 5.x: TrainingArguments(fsdp=..., fsdp_config={'cpu_ram_efficient_loading': True}) exports "
            "FSDP_CPU_RAM_EFFICIENT_LOADING but not ACCELERATE_USE_FSDP (4.57 exported both); under plain torchrun a "
            "from_pretrained after building the arguments is not the efficient load: is_fsdp_enabled() is False and "
            "every rank reads the whole checkpoint (found by this suite's trainer-args loader, not yet reported)"
        ),
        package="transformers",
        affected=">=5.0.0",
        selects=lambda case: True,
        symptoms=dict.fromkeys(ALL_CHECKS, (TRAINER_WIRING_PATH_NOT_TAKEN,)),
        loaders=("trainer-args",),
    ),
    KnownIssue(
        key="gemma3-no-split-modules-name-siglip",
        url=(
            "https://github.com/huggingface/transformers/blob/v5.6.0/src/transformers/models/gemma3/"
            "modeling_gemma3.py#L442"
        ),
        title=(
            "transformers 5.0-5.14: Gemma3PreTrainedModel._no_split_modules names the Siglip vision classes too, so "
            "under TRANSFORMER_BASED_WRAP (TRL's FSDP2 config) accelerate's set_auto_wrap_policy cannot find them in "
            "a text-only Gemma3ForCausalLM and raises on every rank; from 5.15 the list is Gemma3DecoderLayer alone. "
            "The class named depends on set order (transformers keeps _no_split_modules as a set)"
        ),
        package="transformers",
        affected=">=5.0.0,<5.15.0",
        selects=lambda case: case.checkpoint_name == "arch-gemma3-text" and MIXED_PRECISION in case.tags,
        symptoms=dict.fromkeys(ALL_CHECKS, tuple(
            Symptom(kinds=frozenset({ProblemKind.RAISED}), exc_type="ValueError", phase=Phase.FSDP2_PREPARE,
                    message=f"Could not find the transformer layer class {name} in the model.")
            for name in ("SiglipVisionEmbeddings", "SiglipEncoderLayer", "SiglipMultiheadAttentionPoolingHead")
        )),
    ),
    KnownIssue(
        key="reinit-era-memory",
        url="https://github.com/huggingface/transformers/blob/v5.3.0/src/transformers/modeling_utils.py#L4542",
        title=(
            "transformers 5.0.0-5.3.0: ranks 1..N give every parameter and buffer a torch.empty_like placeholder and "
            "mark nothing initialised, so initialize_weights() re-initialises the whole model there: each rank that "
            "only receives commits the whole model during from_pretrained (and loads ~6x slower than rank 0), for "
            "values the broadcast then replaces; 5.4.0 marks the state-dict entries initialised"
        ),
        package="transformers",
        affected=">=5.0.0,<5.4.0",
        selects=_tagged(BIG),
        symptoms={"memory": (WHOLE_MODEL_ON_A_RECEIVING_RANK,)},  # big-qwen3-moe too: 1.01x on 5.3.0
    ),
]


# --- accelerate releases (tox envs acc1130, acc1140; docs/version-matrix.md) ---
# Ranges read from each release's accelerate/utils/fsdp_utils.py (1.10.0 - 1.15.0) and run in the acc* envs.
ACCELERATE_FSDP_UTILS = "https://github.com/huggingface/accelerate/blob/v{}/src/accelerate/utils/fsdp_utils.py"
# torch 2.13's FSDP2 lazy init (_validate_no_duplicate_params), first forward, on every rank; the name is the
# input embedding's FQN, so one exact message per layout the zoo has
TIED_IN_TWO_GROUPS_MESSAGE = (
    "Parameter '{}' is shared with a parameter already managed by another FSDP group. For shared/tied parameters, "
    "use fully_shard([module_a, module_b]) to place them in the same FSDP group."
)
TIED_INPUT_EMBEDDINGS = (  # the zoo's tied cases by layout (acc1140, 29 cases)
    "model.embed_tokens.weight",  # tied-embeddings, Gemma 1-3n, RecurrentGemma, Cohere, SmolLM3, Ernie 4.5, ...
    "model.decoder.embed_tokens.weight",  # OPT
    "transformer.wte.weight",  # GPT-2, GPT-BigCode, GPT-Neo, MPT
    "transformer.word_embeddings.weight",  # Falcon, Bloom
    "transformer.tokens_embed.weight",  # OpenAI GPT
    "transformer.w.weight",  # CTRL
    "biogpt.embed_tokens.weight",  # BioGPT
    "backbone.embeddings.weight",  # Mamba
    "bert.embeddings.word_embeddings.weight",  # BERT-MLM
    "shared.weight",  # T5
)
# checks a forward that raises fails: its own, and the after-loading ones that never run
FORWARD_AND_AFTER = ("forward", "state-dict", "train-step")


def tied_in_two_groups(names: tuple[str, ...]) -> dict[str, tuple[Symptom, ...]]:
    """torch's refusal of a parameter in two FSDP groups, naming one of `names`, for every check it fails."""
    raised = tuple(
        Symptom(kinds=frozenset({ProblemKind.RAISED}), exc_type="ValueError",
                message=TIED_IN_TWO_GROUPS_MESSAGE.format(n), phase=Phase.FORWARD)
        for n in names
    )
    return dict.fromkeys(FORWARD_AND_AFTER, raised)


KNOWN_ISSUES += [
    KnownIssue(
        key="accelerate-tied-embeddings-two-fsdp-groups",
        url="https://github.com/huggingface/accelerate/pull/4171",
        title=(
            "accelerate 1.14.0: fsdp2_prepare_model carves a tail group fully_shard([final_norm, input_embed]) and, "
            "when the embeddings are tied, leaves the output embedding (the same parameter) to the root group; torch "
            "2.13 refuses a parameter visible to two FSDP groups, so any tied-embedding model raises ValueError at "
            "the first forward on every rank (1.15.0 puts both embeddings in the tail group, PR 4171)"
        ),
        package="accelerate",
        affected=">=1.14.0,<1.15.0",
        also={"torch": ">=2.13"},
        selects=_tagged(TIED),
        symptoms=tied_in_two_groups(TIED_INPUT_EMBEDDINGS),
    ),
    KnownIssue(
        key="accelerate-ties-beyond-embeddings-two-fsdp-groups",
        url=ACCELERATE_FSDP_UTILS.format("1.15.0"),
        title=(
            "accelerate 1.15.0's fsdp2_prepare_model puts the input and output embeddings (and the final norm) in a "
            "tail group of their own; a parameter tied beyond that pair stays visible to the root group too (T5's "
            "encoder and decoder embed_tokens share `shared.weight`; BertForMaskedLM's decoder bias is "
            "cls.predictions.bias), and torch 2.13 raises ValueError at the first forward on every rank (found by "
            "this suite, not yet reported; fixed loader: A5)"
        ),
        package="accelerate",
        affected=">=1.15.0",
        also={"torch": ">=2.13"},
        selects=_tagged(TIED_BEYOND_EMBEDDINGS),
        symptoms=tied_in_two_groups(("shared.weight", "None")),  # T5; BERT-MLM's decoder bias, which torch cannot name
    ),
    KnownIssue(
        key="accelerate-3979",
        url="https://github.com/huggingface/accelerate/issues/3979",
        title=(
            "accelerate 1.13.0: under mixed precision fsdp2_prepare_model 'upcasts' trainable parameters with "
            "`param = param.to(torch.float32)` after sharding, which rebinds a local name: master weights stay in "
            "the checkpoint's 16-bit dtype and the optimizer steps them there (PR 3905 made it a no-op; 1.14.0 "
            "upcasts with param.data before fully_shard, PR 3985)"
        ),
        package="accelerate",
        affected=">=1.13.0,<1.14.0",
        selects=lambda case: MIXED_PRECISION in case.tags and case.dtype in HALF_DTYPES,
        # every rank, every trainable parameter: the checkpoint's dtype where the upcast plain load has float32
        symptoms={
            "parameters": tuple(
                Symptom(kinds=frozenset({ProblemKind.DTYPE}), against=Against.PLAIN_LOAD, got=d, want="float32")
                for d in HALF_DTYPES
            ),
        },
    ),
]


# --- transformers 4.57.6 (tox env tf4576) ---
# A non-persistent buffer registered under two names: accelerate's fsdp2_prepare_model saves them with
# `named_buffers()` (duplicates removed) before `model.to("meta")` and re-registers one name only (read in
# 1.10.0, 1.13.0, 1.15.0). Under transformers 5 its own bug fails first (shared-non-persistent-buffer-left-on-meta).
SHARED_BUFFER_NAMES = r"model\.layers\.\d+\.(causal_mask|mamba\.mup_vector)"
META_BUFFER = Symptom(kinds=frozenset({ProblemKind.ON_META}), tensor=SHARED_BUFFER_NAMES)
META_AT_FORWARD = Symptom(
    kinds=frozenset({ProblemKind.RAISED}),
    exc_type="RuntimeError",
    message="Tensor on device meta is not on the expected device cpu!",
    phase=Phase.FORWARD,
)
# accelerate's TRANSFORMER_BASED_WRAP policy raises on the first `_no_split_modules` class the model lacks; in
# transformers 5 `_no_split_modules` is a set, so which of the three comes first varies from run to run
GEMMA3_VISION_CLASSES = ("SiglipVisionEmbeddings", "SiglipEncoderLayer", "SiglipMultiheadAttentionPoolingHead")
NO_SPLIT_CLASS_MISSING = tuple(
    Symptom(kinds=frozenset({ProblemKind.RAISED}), exc_type="ValueError",
            message=f"Could not find the transformer layer class {name} in the model.", phase=Phase.FSDP2_PREPARE,
            when_tagged=MIXED_PRECISION)
    for name in GEMMA3_VISION_CLASSES
)

KNOWN_ISSUES += [
    KnownIssue(
        key="accelerate-shared-non-persistent-buffer-left-on-meta",
        url=ACCELERATE_FSDP_UTILS.format("1.15.0") + "#L839",
        title=(
            "fsdp2_prepare_model keeps each rank's non-persistent buffers by named_buffers(), which drops the second "
            "name of a tensor registered twice, so after model.to('meta') that name stays on meta and the forward "
            "fails (transformers 4.57: the shared-buffer toy, and Falcon-H1, whose layers share mup_vector; found by "
            "this suite, not yet reported)"
        ),
        package="accelerate",
        affected=">=1.10.0",
        also={"transformers": "<5.0.0"},
        selects=lambda case: SHARED_NON_PERSISTENT in case.tags or case.name == "arch-falcon-h1",
        symptoms={"buffers": (META_BUFFER,), "forward": (META_AT_FORWARD,)},
    ),
    KnownIssue(
        key="gemma3-text-no-split-modules-name-vision-classes",
        url="https://github.com/huggingface/transformers/blob/v5.14.0/src/transformers/models/gemma3/modeling_gemma3.py",
        title=(
            "Gemma3PreTrainedModel._no_split_modules names the Siglip vision classes, which the text-only "
            "Gemma3ForCausalLM does not contain; under a TRANSFORMER_BASED_WRAP accelerate config (TRL's FSDP2 "
            "config) accelerate raises ValueError in Accelerator.prepare on every rank (5.15.0 lists the decoder "
            "layer only)"
        ),
        package="transformers",
        affected=">=4.57.6,<5.15.0",
        selects=_named("arch-gemma3-text", "arch-gemma3-text@bf16"),
        symptoms=dict.fromkeys(ALL_CHECKS, NO_SPLIT_CLASS_MISSING),
    ),
]

# --- transformers' own FSDP2 loading (--loader native-fsdp, loaders/native.py), run on 5.24.0 only ---
NATIVE = ("native-fsdp",)
FALCON_H1_MUP = r"model\.layers\.\d+\.mamba\.mup_vector"
DISTRIBUTED = "https://github.com/huggingface/transformers/tree/v5.24.0/src/transformers/distributed"
KNOWN_ISSUES += [
    KnownIssue(
        key="native-fsdp-shared-non-persistent-buffer-left-on-meta",
        url=DISTRIBUTED,
        title=(
            "from_pretrained(distributed_config=...) materialises a buffer registered under two module names under "
            "one name only: the other stays on meta on every rank and the forward fails (found by this suite)"
        ),
        package="transformers",
        affected=">=5.24.0",
        selects=_tagged(SHARED_NON_PERSISTENT),
        symptoms={"buffers": (META_BUFFER,), "forward": (META_AT_FORWARD,)},
        loaders=NATIVE,
    ),
    KnownIssue(
        key="native-fsdp-missing-key-drawn-per-shard",
        url=DISTRIBUTED,
        title=(
            "from_pretrained(distributed_config=...): a key the checkpoint lacks is initialised shard by shard, each "
            "rank drawing its slice from the same seed, so the tensor repeats its first shard (on 2 CPU ranks "
            "lm_head.weight's second half equals its first; measured on CPU/gloo; found by this suite)"
        ),
        package="transformers",
        affected=">=5.24.0",
        selects=_named("missing-head", "missing-head@bf16"),
        symptoms={
            "parameters": (Symptom(kinds=frozenset({ProblemKind.VALUES}), tensor=r"lm_head\.weight",
                                   against=Against.PLAIN_LOAD),),
            "forward": (WRONG_LOGITS,),
        },
        loaders=NATIVE,
    ),
    KnownIssue(
        key="native-fsdp-kimi-linear-conv1d",
        url=DISTRIBUTED,
        title=(
            "from_pretrained(distributed_config=...) loads KimiLinear's short-convolution weight "
            "(self_attn.conv1d.weight, 96x1x4) wrong on every rank: 256/384 elements differ from the plain load "
            "(cause not diagnosed; found by this suite)"
        ),
        package="transformers",
        affected=">=5.24.0",
        selects=_named("arch-kimi-linear"),
        symptoms={
            "parameters": (Symptom(kinds=frozenset({ProblemKind.VALUES}),
                                   tensor=r"model\.layers\.\d+\.self_attn\.conv1d\.weight", against=Against.PLAIN_LOAD),),
            "forward": (WRONG_LOGITS,),
        },
        loaders=NATIVE,
    ),
    KnownIssue(
        key="native-fsdp-falcon-h1-mup-vector-uninitialised",
        url=DISTRIBUTED,
        title=(
            "from_pretrained(distributed_config=...) leaves Falcon-H1's non-persistent mup_vector uninitialised on "
            "every rank (NaN under poisoning), where the plain load computes it (found by this suite)"
        ),
        package="transformers",
        affected=">=5.24.0",
        selects=_named("arch-falcon-h1"),
        symptoms={
            "no-nan": (Symptom(kinds=frozenset({ProblemKind.NON_FINITE}), tensor=FALCON_H1_MUP), NAN_LOGITS),
            "buffers": (Symptom(kinds=frozenset({ProblemKind.VALUES}), tensor=FALCON_H1_MUP),),
            "forward": (WRONG_LOGITS,),
        },
        loaders=NATIVE,
    ),
    KnownIssue(
        key="native-fsdp-half-precision-master-weights",
        url=DISTRIBUTED + "/fsdp.py",
        title=(
            "DistributedConfig(fsdp_mixed_precision=True) only sets a bf16 compute policy: parameters of a 16-bit "
            "checkpoint stay 16-bit, so the optimizer's master weights are bf16/fp16 where accelerate's FSDP2 "
            "preparation keeps fp32 ones (the same consequence as accelerate-3979)"
        ),
        package="transformers",
        affected=">=5.24.0",
        selects=lambda case: MIXED_PRECISION in case.tags and case.dtype in HALF_DTYPES,
        symptoms={
            "parameters": tuple(
                Symptom(kinds=frozenset({ProblemKind.DTYPE}), against=Against.PLAIN_LOAD, got=d, want="float32")
                for d in HALF_DTYPES
            ),
        },
        loaders=NATIVE,
    ),
]


def classify(case: Case, verdict: Verdict, versions: dict[str, str], registry=None, loader: str = "stock") -> Outcome:
    """One verdict read against the registry: passed, failed (with what is unexplained), xfailed or skipped."""
    outcome = Outcome(case.name, verdict.check, Status.PASSED, versions=dict(versions))
    if verdict.skipped:
        outcome.status, outcome.skipped = Status.SKIPPED, verdict.skipped
        return outcome
    registry = KNOWN_ISSUES if registry is None else registry
    issues = [k for k in registry if applies(k, case, verdict.check, versions, loader)]
    outcome.issues = issues
    if not issues:
        if not verdict.passed:
            outcome.status, outcome.problems = Status.FAILED, list(verdict.problems)
        return outcome
    if verdict.passed:  # stale: the registered bug did not show
        outcome.status = Status.FAILED
        return outcome
    unexplained = [p for p in verdict.problems if not any(explains(k, p, case) for k in issues)]
    if unexplained:
        outcome.status, outcome.problems = Status.FAILED, unexplained
        return outcome
    first = next(k for k in issues if any(explains(k, p, case) for p in verdict.problems))
    outcome.status, outcome.problems = Status.XFAILED, list(verdict.problems)
    outcome.issues = [first, *(k for k in issues if k is not first)]
    return outcome


def outcomes(result: CaseResult, case: Case, loader: str, registry=None) -> dict[str, Outcome]:
    """Each check's verdict on one case read against the known upstream issues of the installed stack, for the
    loader it ran under (its own, `Case.loader`, or the run's `loader`)."""
    loader = case.loader or loader
    versions = result.reference.versions if result.reference else stack_versions()
    if any(o.preparation.get("mixed_precision", "no") != "no" for o in result.run.observations.values()):
        case = case.with_tags(MIXED_PRECISION)  # it ran under a mixed-precision config: --accelerate-config, or its own
    if result.reference is not None and result.reference.ties:  # the plain load ties parameters
        case = case.with_tags(tensors={TIED: tuple(name for tie in result.reference.ties for name in tie)})
    return {name: classify(case, v, versions, registry=registry, loader=loader) for name, v in result.verdicts.items()}
