"""rank/progress.py and watchdog.read_progress: the record a rank rewrites in place, read by the parent.

The hang tests (test_hangs.py) prove the watchdog's verdicts on real launches; here, the record itself:
rewritten in place (one pwrite, no temp file and rename), so a shorter record after a longer one must not
leave the longer one's tail, and a read that races the write must not be taken for a rank that never wrote.
"""

from __future__ import annotations

import json
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


def test_a_torn_read_is_read_again_even_when_it_parses(tmp_path, monkeypatch):
    progress = Progress(tmp_path, 0)
    progress(Phase.DONE, "t5")
    old = Path(progress.path).read_bytes()
    progress(Phase.FROM_PRETRAINED, "t6")
    new = Path(progress.path).read_bytes()
    # old and new bytes mixed: valid JSON naming the new case in the old phase; only the CRC tells it is torn
    cut = new.index(b'"t6"') + 4  # after the new case name, before the new phase (whatever the pid's digits)
    torn = new[:cut] + old[cut:]
    assert json.loads(torn.split(b"\n")[0])["phase"] == Phase.DONE
    reads = iter([torn, torn, new])
    monkeypatch.setattr(watchdog.Path, "read_bytes", lambda self: next(reads))
    state = read_progress(tmp_path, 0)
    assert (state["case"], state["phase"]) == ("t6", Phase.FROM_PRETRAINED)


def test_a_record_that_never_reads_whole_is_none(tmp_path, monkeypatch):
    Progress(tmp_path, 0)(Phase.OBSERVE, "case")
    monkeypatch.setattr(watchdog.Path, "read_bytes", lambda self: b'{"pid": 1, "case": "c"}\n00000000')
    assert read_progress(tmp_path, 0) is None


def test_no_record_is_none(tmp_path):
    assert read_progress(tmp_path, 0) is None


def test_the_record_framing_round_trips_padded_and_tells_a_torn_one():
    from fsdp_load_checks.records.protocol import decode_progress, encode_progress

    state = {"pid": 7, "case": "c", "phase": Phase.OBSERVE, "step": 3, "since": 1.5}
    record = encode_progress(state)
    assert decode_progress(record.ljust(len(record) + 40)) == state  # the in-place rewrite's padding
    assert decode_progress(b"  ") is None  # created, not yet written
    other = encode_progress({**state, "case": "d"})
    cut = other.index(b'"d"') + 3  # the new case name, the old CRC; and a CRC line cut short
    for torn in (other[:cut] + record[cut:], other[:-3]):
        try:
            decode_progress(torn)
        except ValueError:
            continue
        raise AssertionError(f"a torn record decoded: {torn!r}")
