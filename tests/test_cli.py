"""The console script as a user meets it: bad input gets one line and exit 2, a checkpoint gets a verdict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_batch import CliRun, run_cli, run_pytest

CLI = [sys.executable, "-m", "fsdp_load_checks.cli"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A stock transformers architecture saved by save_pretrained, as a user would have it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("ckpt") / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory, tiny_gpt2) -> dict[str, Path]:
    import shutil

    base = tmp_path_factory.mktemp("bad")
    not_ckpt = base / "no-config"
    not_ckpt.mkdir()
    (not_ckpt / "notes.txt").write_text("hello")
    no_weights = base / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_gpt2 / "config.json", no_weights / "config.json")
    corrupt = base / "corrupt"
    shutil.copytree(tiny_gpt2, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    unknown = base / "unknown-arch"
    shutil.copytree(tiny_gpt2, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config.update(model_type="no-such-architecture", architectures=["NoSuchForCausalLM"])
    (unknown / "config.json").write_text(json.dumps(config))
    unknown_class = base / "unknown-class"  # a known model type, a class name this transformers lacks
    shutil.copytree(tiny_gpt2, unknown_class)
    config = json.loads((unknown_class / "config.json").read_text())
    config.update(architectures=["NoSuchForCausalLM"])
    (unknown_class / "config.json").write_text(json.dumps(config))
    a_file = base / "file.bin"
    a_file.write_bytes(b"x")
    return {"not_ckpt": not_ckpt, "no_weights": no_weights, "corrupt": corrupt, "unknown": unknown,
            "unknown_class": unknown_class, "gpt2": tiny_gpt2, "file": a_file}


BAD_INPUT = [
    (["--nproc", "0"], "--nproc must be at least 1, got 0"),
    (["--nproc", "-3"], "--nproc must be at least 1, got -3"),
    (["--nproc", "two"], "--nproc must be a positive integer, got 'two'"),
    (["--nproc", "100000"], "far more ranks than this machine"),
    (["--loader", "bogus"], "unknown loader 'bogus'; choose one of: stock, fixed"),
    (["--backend", "nccl", "--nproc", "2"], "--fsdp-backend nccl needs one GPU per rank"),
    (["--cases", "no-such-case"], "matches no case"),
    (["--timeout", "0"], "--fsdp-timeout must be positive"),
    (["--json", "/no/such/dir/report.json"], "directory /no/such/dir does not exist"),
    (["--junit", "/tmp"], "is a directory; pass a file path"),
    (["check", "/no/such/checkpoint"], "checkpoint path /no/such/checkpoint does not exist"),
    (["check", "{not_ckpt}"], "is not a checkpoint directory: no config.json"),
    (["check", "{no_weights}"], "has no *.safetensors files"),
    (["check", "{corrupt}"], "is not a readable safetensors file"),
    (["check", "{unknown}"], "model type 'no-such-architecture' is not known to transformers"),
    (["check", "{unknown_class}"], "config.json names architecture 'NoSuchForCausalLM', which the installed"),
    (["check", "{gpt2}", "--model-class", "NoSuchModel"], "model class 'NoSuchModel' is neither an Auto class nor"),
    (["check", "{file}"], "is a file, not a checkpoint directory"),
    (["check", "{not_ckpt}", "--import", "no_such_module_xyz"], "--import no_such_module_xyz: cannot import it"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.fixture(scope="module")
def bad_input_runs(bad_dirs) -> dict[tuple[str, ...], CliRun]:
    """Every BAD_INPUT command line, in one interpreter (tests/cli_batch.py)."""
    argvs = [[a.format(**bad_dirs) for a in args] for args, _ in BAD_INPUT]
    return {tuple(args): run for (args, _), run in zip(BAD_INPUT, run_cli(argvs, timeout=300))}


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_gets_one_line_and_exit_2(args, message, bad_input_runs):
    if "nccl" in args:
        import torch

        if torch.cuda.device_count() >= 2:
            pytest.skip("this machine has the GPUs, so nccl at --nproc 2 is valid here")
    proc = bad_input_runs[tuple(args)]
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fsdp-load-checks: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_check_a_stock_architecture_checkpoint_writes_every_report(tiny_gpt2, tmp_path):
    md, xml, js = tmp_path / "r.md", tmp_path / "r.xml", tmp_path / "r.json"
    proc = cli("check", str(tiny_gpt2), "--nproc", "2", "--markdown", str(md), "--junit", str(xml), "--json", str(js))
    # a tied model: save_pretrained writes the gathered tie twice, a known upstream issue: expected, not failed
    # (exit 0, said so, xfail in every report); the rest passes
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 passed, 1 known upstream issue(s), 0 failed" in " ".join(proc.stdout.split()), proc.stdout
    assert "| tiny-gpt2 | pass | pass | pass | pass | skip | xfail | pass |" in md.read_text()
    assert 'tests="7" failures="0"' in xml.read_text()
    data = json.loads(js.read_text())
    assert data["passed"] and data["cases"][0]["status"]["buffers"] == "passed"
    assert data["cases"][0]["status"]["state-dict"] == "xfailed"
    # loaded with the class config.json names, and the report says which output the forward check compared
    assert (data["cases"][0]["model_class"], data["cases"][0]["output"]) == ("GPT2LMHeadModel", "logits")
    assert data["cases"][0]["inputs"] == ["input_ids"]  # what the forward and the train step were fed
    assert set(data["cases"][0]["memory"]) == {"0", "1"}  # per-rank memory figures reach the report
    # a tiny model's memory is not judged (skip): its figures come without a bound that would read as a violation
    assert not [k for figures in data["cases"][0]["memory"].values() for k in figures if k.endswith(" bound")]
    assert data["accelerate_config"] == "fsdp2"  # the report names the config and how each rank was prepared
    assert data["cases"][0]["preparation"]["1"]["call"] == "Accelerator.prepare"
    # per-phase wall time of every process: the launch's start-up on its first case, each phase a rank went
    # through, the reference process's build and plain load (-1)
    seconds = data["cases"][0]["seconds"]
    assert set(seconds) == {"0", "1", "-1"}, seconds
    for rank in ("0", "1"):
        assert {"startup", "import", "from_pretrained", "fsdp2_prepare", "observe", "forward", "train_step",
                "cleanup"} <= set(seconds[rank]), seconds[rank]
        assert all(s >= 0 for s in seconds[rank].values()) and seconds[rank]["startup"] > 0
    assert set(seconds["-1"]) == {"checkpoint", "reference"}


def test_a_failed_check_exits_1_and_names_rank_and_tensor(tmp_path):
    proc = cli("zoo", "--cases", "llama-rope", "--loader", "non-persistent-not-recomputed")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    flat = " ".join(proc.stdout.split())  # the console wraps long lines
    assert "FAIL llama-rope/buffers: llama-rope: rank 1 non-persistent buffer" in flat
    assert "inv_freq differs from rank 0's" in flat


FRONT_END_ARGS = [["--fsdp-timeout", "0"], ["--fsdp-timeout", "inf"], ["--nproc", "two"], ["--loader", "bogus"],
                  ["--fsdp-cases", "no-such-case"]]


@pytest.fixture(scope="module")
def front_end_runs(tmp_path_factory) -> dict[tuple[str, ...], tuple[CliRun, CliRun]]:
    """args -> (the CLI's run, pytest's run); each front end's runs in one interpreter (tests/cli_batch.py)."""
    cli_runs = run_cli([["zoo", *a] for a in FRONT_END_ARGS])
    zoo = str(Path(__file__).parent / "test_zoo.py")
    pytest_runs = run_pytest([[*a, "--collect-only", "-q", "-p", "no:cacheprovider", zoo] for a in FRONT_END_ARGS],
                             cwd=tmp_path_factory.mktemp("front-ends"))
    return {tuple(args): runs for args, runs in zip(FRONT_END_ARGS, zip(cli_runs, pytest_runs))}


@pytest.mark.parametrize("args", FRONT_END_ARGS)
def test_both_front_ends_parse_an_option_the_same_way(args, front_end_runs):
    """One option table: the CLI and the pytest plugin reject a bad value with the very same line."""
    cli_run, proc = front_end_runs[tuple(args)]
    from_cli = cli_run.stderr.strip().removeprefix("fsdp-load-checks: error: ")
    assert from_cli and "\n" not in from_cli, from_cli
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage error
    assert f"ERROR: {from_cli}" in proc.stderr, (from_cli, proc.stderr)


def test_the_old_cli_spellings_still_work():
    from fsdp_load_checks.cli import build_parser

    old = build_parser().parse_args(["zoo", "--cases", "llama-rope", "--timeout", "30", "--backend", "gloo"])
    new = build_parser().parse_args(["zoo", "--fsdp-cases", "llama-rope", "--fsdp-timeout", "30", "--fsdp-backend", "gloo"])
    assert vars(old) == vars(new)


def test_the_hang_budget_comes_from_the_option_table():
    from fsdp_load_checks.cli import build_parser
    from fsdp_load_checks.options import launch_config

    args = build_parser().parse_args(["zoo", "--fsdp-hang-budget", "3", "--fsdp-backend", "gloo"])
    assert launch_config(lambda dest: getattr(args, dest)).hang_budget == 3
    defaults = build_parser().parse_args(["zoo", "--fsdp-backend", "gloo"])
    assert launch_config(lambda dest: getattr(defaults, dest)).hang_budget == 2
    for bad, said in (("0", "--fsdp-hang-budget must be at least 1, got 0"), ("two", "must be a positive integer")):
        bad_args = build_parser().parse_args(["zoo", "--fsdp-hang-budget", bad])
        with pytest.raises(ValueError, match=said):
            launch_config(lambda dest: getattr(bad_args, dest))
