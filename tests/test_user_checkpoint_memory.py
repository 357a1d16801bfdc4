"""A correct dense checkpoint a user brings passes `memory` as the first and only case of a launch.

The first `from_pretrained` of an architecture in a process imports its
modeling code lazily (35-80 MiB of anonymous memory); charged to the loader,
that alone failed `memory` on correct checkpoints of 64-310 MiB (0.13x-0.58x
on a rank that only receives). Ranks now resolve the model's class, which
imports that code, before the from_pretrained baseline
(fsdp_load_checks/model_class.py `loadable`). One launch, 2 ranks, one case:
the cheapest run that exercises it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fsdp_load_checks.checks import MEMORY_MIN_MODEL_BYTES, NON_LOADING_RANK_FRACTION

MiB = 1 << 20


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory) -> Path:
    """A dense Llama of ~87 MiB (fp32) saved by save_pretrained, built from a config in code."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=5,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "dense-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_a_correct_dense_checkpoint_passes_memory_as_the_only_case(dense_llama, tmp_path):
    size = sum(f.stat().st_size for f in dense_llama.glob("*.safetensors"))
    assert MEMORY_MIN_MODEL_BYTES <= size <= 400 * MiB, size / MiB  # a size the memory check judges
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fsdp_load_checks.cli", "check", str(dense_llama), "--nproc", "2", "--json", str(report)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (case,) = json.loads(report.read_text())["cases"]
    assert case["status"]["memory"] == "passed", case["messages"].get("memory")  # judged, not skipped
    assert case["model_class"] == "LlamaForCausalLM"
    for rank, figures in case["memory"].items():
        assert figures["from_pretrained"] < NON_LOADING_RANK_FRACTION * figures["model"], (rank, figures)
        # the report gives each bounded phase's allowance next to its figure: the room a pass left
        assert figures["fsdp2_prepare"] <= figures["fsdp2_prepare bound"], (rank, figures)
        assert figures["from_pretrained bound"] == int((1.5 if rank == "0" else 0.1) * figures["model"]), (rank, figures)
