"""The batch's reference process: builds, says so, reloads job files named on stdin, and is never left behind."""

from __future__ import annotations

import json
from types import SimpleNamespace

import psutil
import pytest

from fsdp_load_checks import catalogue, observe
from fsdp_load_checks.parent.reference_process import ReferenceProcess, SetupError
from fsdp_load_checks.records.protocol import reference_path


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_one_process_builds_then_reloads_each_job_file_and_exits_at_end_of_input(tmp_path):
    before = children()
    case = catalogue.select(["llama-rope"])[0]
    with ReferenceProcess(tmp_path, [case], "fsdp2") as reference:
        reference.built(timeout_s=300)
        assert reference_path(tmp_path, case.name).exists()
        # a directory that is not there: the reload is recorded as failed, and the process goes on serving
        jobs = tmp_path / "jobs.json"
        for i in range(2):
            out = tmp_path / f"gone{i}.reload.pt"
            jobs.write_text(json.dumps([{"case": case.name, "directory": str(tmp_path / "gone"), "out": str(out)}]))
            assert reference.reload(jobs, timeout_s=120) == ""
            failure = observe.read_reload(str(out)).failure
            assert failure is not None and failure.phase == "reload", failure
        pid = reference.proc.pid
    assert reference.proc.returncode == 0  # it left by itself at end of input, not by force
    assert pid not in children() and children() <= before


def test_a_reference_process_that_fails_is_one_setup_error_with_its_last_line(tmp_path):
    before = children()
    with pytest.raises(SetupError, match=r"building checkpoints/references failed: KeyError: 'no-such-case'"):
        with ReferenceProcess(tmp_path, [SimpleNamespace(reference_name="no-such-case")], "fsdp2") as reference:
            reference.built(timeout_s=300)
    assert children() <= before
