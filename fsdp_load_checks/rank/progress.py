"""Where this rank is, written to its progress file for the parent's watchdog and crash reports."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fsdp_load_checks.rank import faults
from fsdp_load_checks.records import Phase
from fsdp_load_checks.records.protocol import encode_progress, progress_path


class Progress:
    """Call with a phase (and a case when one starts); `tick()` before each collective."""

    def __init__(self, out_dir: Path, rank: int):
        self.path = progress_path(out_dir, rank)
        self.rank = rank
        self.case = ""
        self.phase = ""
        self.step = 0  # collectives announced in this phase: the rank furthest behind is the one that hangs
        self.fault: str | None = None
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # open for the rank's life
        self.width = 256

    def __call__(self, phase: Phase, case: str | None = None, fault: str | None = None) -> None:
        if case is not None:
            self.case, self.fault = case, fault
        self.phase, self.step = phase, 0
        self._write()
        faults.fire(self.fault, phase, self.rank)

    def tick(self) -> None:
        """Called before each collective, so a peer blocked in it is seen ahead of the rank that never came."""
        self.step += 1
        self._write()

    def _write(self) -> None:
        state = {"pid": os.getpid(), "case": self.case, "phase": self.phase, "step": self.step, "since": time.time()}
        record = encode_progress(state)
        # one pwrite over the last record, padded with spaces to the longest written so far: a temp file and a
        # rename cost ~250 us an announcement on this disk, ~5% of a case's CPU at 8 ranks. A reader racing the
        # write may see old and new bytes mixed, which can still parse as JSON: the CRC tells it to read again
        self.width = max(self.width, len(record))
        os.pwrite(self.fd, record.ljust(self.width), 0)
