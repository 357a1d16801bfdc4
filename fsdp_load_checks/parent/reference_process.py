"""The parent's handle on a batch's reference process: one interpreter builds, then reloads after the launches.

    with ReferenceProcess(root, cases, run_config) as ref:
        ref.checkpoints_built(timeout_s)  # every checkpoint is on disk: the launches may start
        ... the launches (the process observes the plain loads meanwhile) ...
        ref.built(timeout_s)              # and every plain-load observation
        why = ref.reload(jobs_file, timeout_s)   # rank 0's save_pretrained directories, loaded back plain

The process is `python -m fsdp_load_checks.reference ROOT CASE... --serve`
(reference/__main__.py): it says a line on stdout when each step is done and
exits at end of input. Before, building and reloading were two interpreters
per batch; each costs ~9 s of CPU for its imports alone (torch 3.5 s,
torch.distributed.tensor and transformers the rest, on the 2-core CI machine).
Its stderr goes to a log file beside the batch, never to a pipe nobody reads.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fsdp_load_checks.parent import stop
from fsdp_load_checks.parent.launch import child_env
from fsdp_load_checks.records import Case
from fsdp_load_checks.records.protocol import REFERENCE_BUILT, REFERENCE_CHECKPOINTS, REFERENCE_RELOADED


class SetupError(RuntimeError):
    """The environment, not a case, is broken (the reference process could not even run)."""


class ReferenceProcess:
    """One reference process for one batch; ended (with everything under it) on leaving the `with` block."""

    def __init__(self, root: Path, cases: list[Case], run_config: str):
        root.mkdir(parents=True, exist_ok=True)
        fd, log = tempfile.mkstemp(prefix="reference-", suffix=".log", dir=root)
        self.log = Path(log)
        names = dict.fromkeys(c.reference_name for c in cases)  # a loader variant shares its case's plain load
        cmd = [sys.executable, "-m", "fsdp_load_checks.reference", str(root), *names,
               "--accelerate-config", run_config, "--serve"]
        with os.fdopen(fd, "w") as err:
            self.proc = stop.spawn(cmd, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                   text=True)

    def __enter__(self) -> ReferenceProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End of input: the process exits by itself; ended by force if it does not within a few seconds."""
        if self.proc.returncode is None and self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        stop.end(self.proc)
        self.proc.stdout.close()

    def _said(self, expected: str, timeout_s: float) -> str:
        """'' once the process said `expected` (lines before it are passed over); else why not (it exited, or
        said nothing for `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return f"no answer in {timeout_s:g}s"
            line = self.proc.stdout.readline()
            if line.strip() == expected:
                return ""
            if not line:  # end of file: the process exited
                self.proc.wait()
                return f"exited with status {self.proc.returncode}: {self.last_error()}"

    def last_error(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(no output)"

    def checkpoints_built(self, timeout_s: float) -> None:
        """Wait until every case's checkpoint is written, all a launch needs: the ranks start and run while the
        process goes on to the plain loads (~0.3 s of one core per toy case: the zoo's launch waited 44 s for them).
        SetupError as `built`."""
        self._wait(REFERENCE_CHECKPOINTS, timeout_s)

    def built(self, timeout_s: float) -> None:
        """Wait until every case's checkpoint and plain-load observation is written. SetupError if the process
        failed (its last stderr line, then the log's tail) or took longer than `timeout_s`."""
        self._wait(REFERENCE_BUILT, timeout_s)

    def _wait(self, expected: str, timeout_s: float) -> None:
        why = self._said(expected, timeout_s)
        if why.startswith("no answer"):
            raise SetupError(f"building checkpoints/references took more than {timeout_s:g}s")
        if why:
            tail = self.log.read_text(errors="replace")[-4000:]
            raise SetupError(f"building checkpoints/references failed: {self.last_error()}\n{tail}")

    def reload(self, jobs_file: Path, timeout_s: float) -> str:
        """Have the process reload every job of `jobs_file` (reference/reload.py); '' when it did, else why not."""
        try:
            self.proc.stdin.write(f"{jobs_file}\n")
            self.proc.stdin.flush()
        except OSError:  # it is gone already
            self.proc.wait()
            return f"the reference process exited with status {self.proc.returncode}: {self.last_error()}"
        why = self._said(REFERENCE_RELOADED, timeout_s)
        if why.startswith("no answer"):
            return f"the reload took more than {timeout_s:g}s"
        return f"the reference process {why}" if why else ""
