"""A rank that wrote no result for a case: how it was lost, from the watchdog, exit codes and logs."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from fsdp_load_checks.parent.watchdog import Watch, read_progress
from fsdp_load_checks.records import LostHow, LostRank, Phase
from fsdp_load_checks.records.protocol import launch_log, log_path

EXIT_CODE_RE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def exit_codes(log: Path) -> dict[int, int]:
    """Per-rank exit codes from torchrun's failure summary (it prints them only on failure)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return {}
    return {int(r): int(c) for r, c in EXIT_CODE_RE.findall(text)}


def lost_ranks(case: str, missing: list[int], out_dir: Path, cfg, watch: Watch, port_tries: int) -> list[LostRank]:
    """One LostRank per missing rank, the rank that failed first listed first."""
    codes: dict[int, int] = {}
    for node in range(cfg.nnodes):
        codes.update(exit_codes(launch_log(out_dir, node)))
    lost = []
    for r in missing:
        state = read_progress(out_dir, r) or {"case": case, "phase": Phase.STARTUP}
        phase_case = "" if state.get("case") in (case, "") else str(state.get("case"))
        found = LostRank(r, case, Phase.of(state["phase"]), LostHow.STOPPED, codes.get(r), tail(log_path(out_dir, r)),
                         phase_case=phase_case)
        if r in watch.hung:
            found.how, found.timeout_s = LostHow.HUNG, cfg.case_timeout_s
            found.waited_by = tuple(sorted(watch.waiting))
            found.collective = ", ".join(sorted(set(watch.collective.values())))
        elif r in watch.waiting:
            found.how, found.behind = LostHow.BLOCKED, tuple(sorted(watch.hung))
            found.collective = watch.collective.get(r, "")
        elif r in watch.overdue:
            found.how, found.timeout_s, found.why = LostHow.OVERDUE, cfg.case_timeout_s, watch.why
        elif watch.port_in_use and read_progress(out_dir, r) is None:
            found.how, found.port, found.port_tries = LostHow.NEVER_STARTED, watch.port_in_use, port_tries
        elif watch.startup_timeout:
            found.how, found.timeout_s = LostHow.STARTUP_TIMEOUT, cfg.startup_timeout_s
        elif codes.get(r, 0) not in (0, -signal.SIGTERM, -signal.SIGKILL):
            found.how = LostHow.DIED
        lost.append(found)
    lost.sort(key=lambda x: (x.how.blames_a_peer, x.rank))
    return lost
