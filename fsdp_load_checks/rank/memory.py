"""Host (and GPU) memory per rank and phase: what the loader committed, and its peak.

The figure is RssAnon: anonymous resident pages, exact and cheap to read
(no smaps walk), taken from /proc/self/statm as resident - shared pages (the
kernel's task_statm: shared = file + shmem pages, resident = shared + anon,
so the difference is RssAnon to the page; 1.6 us a read from a kept-open
descriptor against 24 us for parsing /proc/self/status, which matters at
200 samples a second on each of 8 ranks sharing 2 cores).

Not RSS, not USS: safetensors are
memory-mapped, and checkpoint pages a rank merely maps, or rank 0 reads,
are file pages the kernel can drop; the regression this guards against
(transformers 5.6-5.22 `zeros_like` on ranks 1..N) shows up as anonymous
pages, one model's worth per rank. A sampler thread catches peaks between
phase boundaries. On CUDA, `torch.cuda.max_memory_allocated` per phase too.
"""

from __future__ import annotations

import os
import threading
import time

from fsdp_load_checks.records import MemoryProfile, PhaseMemory

SAMPLE_S = 0.005  # the sampler's period; a regression commits for far longer than this
TRACE_S = 0.05  # the stored trace (for plots) is thinned to this spacing
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
STATM = "/proc/self/statm"


def open_statm() -> int | None:
    """A descriptor on this process's /proc/self/statm (re-read with pread), or None off Linux."""
    try:
        return os.open(STATM, os.O_RDONLY)
    except OSError:
        return None


def anon_bytes(statm_fd: int | None = None) -> int:
    """This process's anonymous resident memory in bytes (RssAnon); `statm_fd` from open_statm() saves the open.

    Off Linux (no /proc/self/statm to open) psutil's RSS instead. OSError: statm opened but unreadable; not
    swapped for RSS mid-run, which would mix two different figures in one profile."""
    fd = open_statm() if statm_fd is None else statm_fd
    if fd is not None:
        try:
            fields = os.pread(fd, 128, 0).split()  # size resident shared text lib data dt, in pages
            return (int(fields[1]) - int(fields[2])) * PAGE_BYTES
        finally:
            if statm_fd is None:
                os.close(fd)
    import psutil  # not Linux: RSS is the closest portable figure (over-counts mapped file pages)

    return psutil.Process().memory_info().rss


class Sampler:
    """Samples anon_bytes() on a thread; `phase(name)` closes the previous phase and opens the next.

    `seconds`, when given, receives each closed phase's wall time (phase -> s): the phase boundaries the
    memory figures use are the ones the timing uses.
    """

    def __init__(self, profile: MemoryProfile, cuda: bool = False, seconds: dict[str, float] | None = None):
        self.profile = profile
        self.cuda = cuda
        self.seconds = seconds
        self.t0 = time.monotonic()
        self.current: str | None = None
        self.peak = 0
        self.start_bytes = 0
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None  # what stopped the sampler thread, raised by the next phase()
        self.statm_fd = open_statm()  # this process's: opened here, in the rank, not inherited
        self.thread = threading.Thread(target=self._run, name="fsdp-load-checks-memory", daemon=True)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.phase(None)
        finally:  # the thread and descriptor end even when the sampler had stopped (phase() raised)
            self.stop_event.set()
            self.thread.join(timeout=1)
            if self.statm_fd is not None and not self.thread.is_alive():
                os.close(self.statm_fd)
                self.statm_fd = None

    def _run(self) -> None:
        last_trace = -1.0
        try:
            while not self.stop_event.wait(SAMPLE_S):
                now, value = time.monotonic() - self.t0, anon_bytes(self.statm_fd)
                with self.lock:
                    self.peak = max(self.peak, value)
                if now - last_trace >= TRACE_S:
                    self.profile.trace.append((now, value))
                    last_trace = now
        except Exception as exc:  # a dead sampler would leave peaks unseen: the case fails instead (phase())
            self.error = exc

    def phase(self, name: str | None) -> None:
        """Close the open phase (its start, end and peak bytes into the profile) and open `name` (None: none).

        RuntimeError: the sampler thread stopped, so the closed phase's peak may be missed."""
        if self.error is not None:
            stopped = self.error
            raise RuntimeError(f"the memory sampler stopped ({stopped!r}): peaks between phases unseen") from stopped
        value = anon_bytes(self.statm_fd)
        now = time.monotonic() - self.t0
        with self.lock:
            if self.current is not None:
                cuda_peak = None
                if self.cuda:
                    import torch

                    cuda_peak = torch.cuda.max_memory_allocated()
                peak = max(self.peak, value)
                self.profile.phases[self.current] = PhaseMemory(self.start_bytes, value, peak, cuda_peak)
                if self.seconds is not None:  # the open phase began at the last mark
                    self.seconds[self.current] = round(now - self.profile.marks[-1][0], 4)
            self.current, self.start_bytes, self.peak = name, value, value
        self.profile.trace.append((now, value))
        if name is not None:
            self.profile.marks.append((now, name))
            if self.cuda:
                import torch

                torch.cuda.reset_peak_memory_stats()
