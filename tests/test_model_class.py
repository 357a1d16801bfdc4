"""Which class a checkpoint loads with (fsdp_load_checks/model_class.py): single process, no launch."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fsdp_load_checks import model_class  # noqa: E402
from fsdp_load_checks.model_class import UnknownModelClass  # noqa: E402


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    """An encoder saved from its base class, as embedding models are: config.json names BertModel."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("ckpt") / "bert"
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "name, want",
    [("AutoModel", "AutoModel"), ("AutoModelForSequenceClassification", "AutoModelForSequenceClassification"),
     ("LlamaModel", "LlamaModel"), ("BertForMaskedLM", "BertForMaskedLM")],
)
def test_resolves_auto_classes_and_transformers_classes(name, want):
    assert model_class.resolve(name).__name__ == want


def test_resolves_a_class_registered_by_an_imported_module():
    import toy_models.register  # noqa: F401 - registers ToyForCausalLM with AutoModelForCausalLM
    from toy_models.decoder import ToyForCausalLM

    assert model_class.resolve("ToyForCausalLM") is ToyForCausalLM


@pytest.mark.parametrize("name", ["NoSuchModel", "LlamaConfig", "AutoConfig", "os", "", "Llama Model"])
def test_a_name_that_is_no_model_class_is_one_line(name):
    with pytest.raises(UnknownModelClass) as exc:
        model_class.resolve(name)
    assert "\n" not in str(exc.value) and "--model-class" in str(exc.value)


def test_the_config_names_the_class_and_an_override_wins(bert_base):
    assert model_class.named_in(bert_base) == "BertModel"  # not BertLMHeadModel, as AutoModelForCausalLM would pick
    assert model_class.named_in(bert_base, "AutoModelForMaskedLM") == "AutoModelForMaskedLM"
    with pytest.raises(UnknownModelClass, match="AutoModelForImageClassification has no class for model type 'bert'"):
        model_class.named_in(bert_base, "AutoModelForImageClassification")


def test_a_config_that_names_no_class_loads_as_a_causal_lm(bert_base, tmp_path):
    import shutil

    shutil.copytree(bert_base, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    assert model_class.named_in(tmp_path / "c") == model_class.CAUSAL_LM


def test_an_auto_class_resolves_to_the_concrete_class_for_the_config():
    from transformers import BertConfig, LlamaConfig

    assert model_class.concrete(model_class.resolve("AutoModel"), LlamaConfig()).__name__ == "LlamaModel"
    assert model_class.concrete(model_class.resolve("AutoModel"), BertConfig()).__name__ == "BertModel"
    bert = model_class.resolve("BertModel")
    assert model_class.concrete(bert, LlamaConfig()) is bert  # a concrete class is what the user asked for
