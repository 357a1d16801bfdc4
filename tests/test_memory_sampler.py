"""rank/memory.py: the anonymous-memory figure every memory verdict is made of, and the sampler's peaks.

The memory check's detection tests (test_detection.py) prove a regression fails on real launches; here,
that the cheap reading (/proc/self/statm, resident - shared) is RssAnon to the byte, and that the sampler
sees a peak that comes and goes inside one phase.
"""

from __future__ import annotations

import mmap
import os
import sys
import time

import pytest
import torch

from fsdp_load_checks.rank import memory
from fsdp_load_checks.records import MemoryProfile

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
MIB = 1 << 20


def rss_anon_from_status() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def same_moment_readings() -> tuple[int, int]:
    """(statm figure, status figure) read with nothing allocated between: two equal status reads around it."""
    fd = memory.open_statm()
    try:
        for _ in range(20):
            before = rss_anon_from_status()
            figure = memory.anon_bytes(fd)
            if rss_anon_from_status() == before:
                return figure, before
    finally:
        os.close(fd)
    raise AssertionError("the interpreter kept allocating between reads")


def test_statm_figure_is_rss_anon_and_leaves_out_mapped_file_pages(tmp_path):
    figure, status = same_moment_readings()
    assert figure == status
    held = torch.ones(64 * MIB // 4)  # 64 MiB of anonymous pages, written
    figure, status = same_moment_readings()
    assert figure == status
    path = tmp_path / "mapped"
    path.write_bytes(b"\1" * (32 * MIB))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        start = memory.anon_bytes()
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == 32 * MIB // 4096  # every page resident
        assert abs(memory.anon_bytes() - start) < MIB  # file pages: not committed memory
        figure, status = same_moment_readings()
        assert figure == status
    del held


def test_sampler_records_a_peak_that_is_freed_within_the_phase():
    profile = MemoryProfile(model_bytes=0)
    with memory.Sampler(profile) as sampler:
        sampler.phase("load")
        transient = torch.ones(96 * MIB // 4)
        time.sleep(20 * memory.SAMPLE_S)
        del transient  # above the mmap threshold the ranks run with: returned to the system at once
        sampler.phase("after")
    load = profile.phases["load"]
    assert load.peak - load.start >= 90 * MIB
    assert profile.phases["after"].peak - profile.phases["after"].start < 8 * MIB


def test_a_sampler_that_stopped_fails_the_next_phase_not_its_peaks(monkeypatch):
    profile = MemoryProfile(model_bytes=0)
    with pytest.raises(RuntimeError, match="memory sampler stopped.*unreadable"):
        with memory.Sampler(profile) as sampler:
            sampler.phase("load")
            def unreadable(fd=None):
                raise OSError(5, "statm unreadable")
            monkeypatch.setattr(memory, "anon_bytes", unreadable)
            sampler.thread.join(timeout=50 * memory.SAMPLE_S)  # the thread ends on its first failed reading
            assert not sampler.thread.is_alive()
            sampler.phase("after")
    assert sampler.statm_fd is None  # closed on the way out all the same
