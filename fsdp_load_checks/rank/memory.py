"""Host (and GPU) memory per rank and phase: what the loader committed, and its peak.

The figure is RssAnon from /proc/self/status: anonymous resident pages,
exact and cheap to read (no smaps walk). Not RSS, not USS: safetensors are
memory-mapped, and checkpoint pages a rank merely maps, or rank 0 reads,
are file pages the kernel can drop; the regression this guards against
(transformers 5.6-5.22 `zeros_like` on ranks 1..N) shows up as anonymous
pages, one model's worth per rank. A sampler thread catches peaks between
phase boundaries. On CUDA, `torch.cuda.max_memory_allocated` per phase too.
"""

from __future__ import annotations

import threading
import time

from fsdp_load_checks.records import MemoryProfile, PhaseMemory

SAMPLE_S = 0.005  # the sampler's period; a regression commits for far longer than this
TRACE_S = 0.05  # the stored trace (for plots) is thinned to this spacing


def anon_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
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
        self.thread = threading.Thread(target=self._run, name="fsdp-load-checks-memory", daemon=True)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.phase(None)
        self.stop_event.set()
        self.thread.join(timeout=1)

    def _run(self) -> None:
        last_trace = -1.0
        while not self.stop_event.wait(SAMPLE_S):
            now, value = time.monotonic() - self.t0, anon_bytes()
            with self.lock:
                self.peak = max(self.peak, value)
            if now - last_trace >= TRACE_S:
                self.profile.trace.append((now, value))
                last_trace = now

    def phase(self, name: str | None) -> None:
        value = anon_bytes()
        now = time.monotonic() - self.t0
        with self.lock:
            if self.current is not None:
                cuda_peak = None
                if self.cuda:
                    import torch

                    cuda_peak = torch.cuda.max_memory_allocated()
                self.profile.phases[self.current] = PhaseMemory(self.start_bytes, value, max(self.peak, value), cuda_peak)
                if self.seconds is not None:  # the open phase began at the last mark
                    self.seconds[self.current] = round(now - self.profile.marks[-1][0], 4)
            self.current, self.start_bytes, self.peak = name, value, value
        self.profile.trace.append((now, value))
        if name is not None:
            self.profile.marks.append((now, name))
            if self.cuda:
                import torch

                torch.cuda.reset_peak_memory_stats()
