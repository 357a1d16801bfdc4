"""The real-architecture cases build tiny, run, and are tagged by what their model really holds.

Single process, no torchrun: builds each case's model from its config with
its class, the way checkpoints.build does (model_class.from_config), and runs
a forward pass.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fsdp_load_checks import model_class  # noqa: E402
from fsdp_load_checks.catalogue import all_cases  # noqa: E402
from fsdp_load_checks.inputs import model_inputs  # noqa: E402
from fsdp_load_checks.observe import primary_output  # noqa: E402
from fsdp_load_checks.records import PERSISTENT_BUFFER  # noqa: E402
from fsdp_load_checks.records.case import MISSING_PARAMETERS  # noqa: E402
from toy_models.architectures import ARCH_CASES, BASE_MODEL_CLASS, SKIPPED_ARCHS  # noqa: E402

REQUIRED = (
    "llama mistral mixtral qwen2 qwen2_moe qwen3 qwen3_moe deepseek_v3 deepseek_v2 gemma gemma2 gemma3_text "
    "gpt2 gpt_neox phi phi3 olmo olmo2 starcoder2 stablelm granite granitemoe cohere falcon opt bloom gptj "
    "codegen smollm3 glm glm4 glm4_moe ernie4_5 helium"
).split()

MAX_PARAMS = 2_000_000


def _name(model_type: str) -> str:
    return "arch-" + model_type.replace("_", "-")


def test_enough_architectures():
    assert len(ARCH_CASES) >= 20
    names = [c.name for c in ARCH_CASES]
    assert len(names) == len(set(names))


def test_cases_are_in_the_catalogue():
    catalogue = all_cases()
    for case in ARCH_CASES:
        assert catalogue[case.name] is case


def test_every_required_architecture_is_a_case_or_skipped_with_a_reason():
    names = {c.name for c in ARCH_CASES}
    for model_type in REQUIRED:
        in_cases = _name(model_type) in names
        assert in_cases or model_type in SKIPPED_ARCHS, f"{model_type} is neither a case nor in SKIPPED_ARCHS"
        assert not (in_cases and model_type in SKIPPED_ARCHS), f"{model_type} is both a case and skipped"
    for model_type, reason in SKIPPED_ARCHS.items():
        assert _name(model_type) not in names, f"{model_type} is both a case and skipped"
        assert reason.strip() and "\n" not in reason


@pytest.mark.parametrize("case", ARCH_CASES, ids=lambda c: c.name)
def test_case_fields(case):
    assert case.name.startswith("arch-") and "_" not in case.name
    assert case.guards.strip() and "\n" not in case.guards
    assert case.imports == () and case.dtype == "float32" and case.seed == 0
    assert "arch" in case.tags
    assert not case.drop_keys and not case.extra_keys and case.fault is None


@pytest.mark.parametrize("case", ARCH_CASES, ids=lambda c: c.name)
def test_builds_tiny_and_runs(case):
    import torch

    config = case.config()
    base = case.model_class == BASE_MODEL_CLASS
    head = case.checkpoint_class is not None  # a classifier on a checkpoint saved without it
    assert case.name.startswith(_name(config.model_type))
    assert case.name.endswith("-base") == base and case.name.endswith("-seq-cls") == head
    torch.manual_seed(case.seed)
    model = model_class.from_config(case.model_class, config).eval()

    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < MAX_PARAMS, f"{case.name}: {n_params} parameters is not tiny"

    keys = set(model.state_dict())
    persistent = [name for name, _ in model.named_buffers() if name in keys]
    assert bool(persistent) == (PERSISTENT_BUFFER in case.tags), (
        f"{case.name}: persistent buffers {persistent} but tags {sorted(case.tags)}"
    )

    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.arange(16).view(2, 8) % vocab
    with torch.no_grad():
        output, value = primary_output(model(**model_inputs(model, ids)))
    assert output == ("last_hidden_state" if base else "logits")
    classifier = case.model_class == "AutoModelForSequenceClassification"  # one row of logits per sequence
    assert value.shape[:2] == ((2, config.num_labels) if classifier else (2, 8))
    assert torch.isfinite(value).all(), f"{case.name}: non-finite {output}"


IMAGE_CASES = [c for c in ARCH_CASES if c.model_class == "AutoModelForImageTextToText"]
# Gemma 3's multi-modal projector initialises to zeros (Gemma3PreTrainedModel._init_weights), so in a tiny
# checkpoint no image reaches the output; its image still runs through the vision tower on every rank
IMAGE_UNREAD = {"arch-gemma3"}


def test_every_vision_language_case_gets_an_image():
    from fsdp_load_checks.inputs import IMAGE_FAMILIES

    assert len(IMAGE_CASES) >= 5
    assert {c.config().model_type for c in IMAGE_CASES} <= set(IMAGE_FAMILIES)


@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda c: c.name)
def test_the_image_reaches_the_output(case):
    """The forward and train-step inputs carry an image the model really reads: another image, other logits."""
    import torch

    torch.manual_seed(case.seed)
    model = model_class.from_config(case.model_class, case.config()).eval()
    ids = torch.arange(16).view(2, 8) % model.config.get_text_config().vocab_size
    inputs = model_inputs(model, ids)
    assert "pixel_values" in inputs
    assert (inputs["input_ids"] != ids).any(dim=1).all()  # each sequence holds its image's tokens
    with torch.no_grad():
        logits = model(**inputs).logits
        other = model(**{**inputs, "pixel_values": 1 - inputs["pixel_values"]}).logits
    assert torch.equal(logits, other) == (case.name in IMAGE_UNREAD)


HEAD_CASES = [c for c in ARCH_CASES if c.checkpoint_class is not None]


def test_heads_on_other_checkpoints_are_cases():
    assert {c.name for c in HEAD_CASES} >= {"arch-bert-seq-cls", "arch-llama-seq-cls"}


@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: c.name)
def test_a_head_case_misses_exactly_its_tagged_parameters(case, tmp_path):
    """What the known issues select by (MISSING_PARAMETERS) is what from_pretrained reports missing."""
    import torch

    torch.manual_seed(case.seed)
    model_class.from_config(case.checkpoint_class, case.config()).save_pretrained(tmp_path)
    _, info = model_class.resolve(case.model_class).from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == set(case.tensors[MISSING_PARAMETERS]), info
