"""rank/progress.py and watchdog.read_progress: the record a rank rewrites in place, read by the parent.

The hang tests (test_hangs.py) prove the watchdog's verdicts on real launches; here, the record itself:
rewritten in place (one pwrite, no temp file and rename), so a shorter record after a longer one must not
leave the longer one's tail, and a read that races the write must not be taken for a rank that never wrote.
"""

from __future__ import annotations

from pathlib import Path

from fsdp_load_checks.parent import watchdog
from fsdp_load_checks.parent.watchdog import read_progress
from fsdp_load_checks.rank.progress import Progress
from fsdp_load_checks.records import Phase


def test_each_announcement_replaces_the_last_whatever_its_length(tmp_path):
    progress = Progress(tmp_path, 3)
    assert read_progress(tmp_path, 3) is None  # created, nothing announced yet: as if no file
    progress(Phase.FROM_PRETRAINED, "c" * 600)  # longer than the initial record width
    assert read_progress(tmp_path, 3)["case"] == "c" * 600
    progress(Phase.OBSERVE, "short")
    progress.tick()
    progress.tick()
    state = read_progress(tmp_path, 3)
    assert (state["case"], state["phase"], state["step"]) == ("short", Phase.OBSERVE, 2)
    assert state["pid"] > 0


def test_a_torn_read_is_read_again(tmp_path, monkeypatch):
    progress = Progress(tmp_path, 0)
    progress(Phase.FORWARD, "case")
    whole = Path(progress.path).read_text()
    reads = iter([whole[:20] + " " * (len(whole) - 20), whole])  # the first read raced the write
    monkeypatch.setattr(watchdog.Path, "read_text", lambda self: next(reads))
    assert read_progress(tmp_path, 0)["phase"] == Phase.FORWARD


def test_no_record_is_none(tmp_path):
    assert read_progress(tmp_path, 0) is None
