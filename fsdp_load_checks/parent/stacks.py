"""Which rank a hang is behind, read from the Python stacks each rank dumps into its log.

The watchdog asks every rank still in an overdue case for its stacks
(faulthandler on SIGUSR1, watchdog.dump_stacks). A rank whose innermost torch
frames are inside torch.distributed waits in a collective for a peer; a rank
that is not (asleep, spinning, stuck in its own or a library's code) is the one
the others wait for. The whole innermost run of torch frames is read, not only
the last frame: a collective reached through DTensor ends in torch/_ops.py, and
gloo's `broadcast` ends in torch/distributed/distributed_c10d.py.

Progress ticks (watchdog.split_overdue) already order ranks within our own
observe phase; stacks decide where they tie, e.g. inside accelerate's
`fsdp2_prepare_model`, where no tick is announced. When stacks cannot tell
(missing, or every rank waits in a collective), the ranks are OVERDUE, not HUNG.

Verified on gloo (CPU), where a collective blocks the calling thread. On nccl a
collective returns before it completes, so a waiting rank is seen at its next
CUDA synchronisation instead, outside torch.distributed; there the stacks decide
less often and progress ticks carry the judgement (not verified: no machine
with two GPUs was available).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from itertools import takewhile
from pathlib import Path

from fsdp_load_checks.parent.watchdog import Watch
from fsdp_load_checks.records.protocol import log_path

THREAD_RE = re.compile(r"^(?:Current thread|Thread) 0x[0-9a-fA-F]+.*\(most recent call first\):\s*$")
FRAME_RE = re.compile(r'^\s+File "(?P<file>.*)", line \d+ in (?P<func>\S+)\s*$')


@dataclass(frozen=True)
class Frame:
    file: str
    func: str

    @property
    def in_torch(self) -> bool:
        return "/torch/" in self.file.replace("\\", "/")

    @property
    def in_distributed(self) -> bool:
        return "/torch/distributed/" in self.file.replace("\\", "/")


def threads(text: str) -> list[list[Frame]]:
    """Every thread's stack in `text` (faulthandler's format), innermost frame first, in the order written."""
    out: list[list[Frame]] = []
    current: list[Frame] | None = None
    for line in text.splitlines():
        if THREAD_RE.match(line):
            current = []
            out.append(current)
        elif current is not None:
            found = FRAME_RE.match(line)
            if found:
                current.append(Frame(found["file"], found["func"]))
            elif line.strip() != "...":  # faulthandler's mark for frames beyond its depth limit
                current = None
    return out


def main_stack(text: str) -> list[Frame] | None:
    """The main thread's stack in the last dump of a log: the last stack not started by `threading`."""
    for stack in reversed(threads(text)):
        if stack and not any(f.func == "_bootstrap" and f.file.endswith("threading.py") for f in stack):
            return stack
    return None


def waiting_in(stack: list[Frame]) -> str:
    """The torch function a stack waits in for its peers ("" when its innermost torch frames are no collective).

    torch.distributed's own collective (broadcast, all_gather, barrier, ...) when one is among them,
    else the outermost torch frame, the API its caller entered (e.g. DTensor's full_tensor).
    """
    block = list(takewhile(lambda f: f.in_torch, stack))
    if not any(f.in_distributed for f in block):
        return ""
    c10d = [f.func for f in block if f.file.endswith("distributed_c10d.py")]
    return c10d[0] if c10d else block[-1].func


def read_stack(out_dir: Path, rank: int) -> list[Frame] | None:
    try:
        return main_stack(log_path(out_dir, rank).read_text(errors="replace"))
    except OSError:
        return None


def judge(watch: Watch, stacks: dict[int, list[Frame] | None]) -> Watch:
    """`watch` with its tie resolved by the ranks' stacks, and the collective each waiting rank waits in.

    `watch.hung` are the overdue ranks furthest behind by progress; when there are several, the ones
    waiting in a collective are moved to `waiting`. Ranks whose stacks cannot decide become `overdue`.
    """
    where = {r: waiting_in(s) for r, s in stacks.items() if s}
    hung, waiting, overdue, why = set(watch.hung), set(watch.waiting), set(), ""
    if len(hung) > 1:
        silent = {r for r in hung if not stacks.get(r)}
        in_collective = {r for r in hung if where.get(r)}
        free = hung - silent - in_collective
        if free:
            hung, waiting, overdue = free, waiting | in_collective, silent
            why = f"rank {_ranks(silent)} left no Python stacks" if silent else ""
        else:
            hung, overdue = set(), hung
            names = ", ".join(sorted({where[r] for r in in_collective}))
            why = (f"rank {_ranks(silent)} left no Python stacks" if silent
                   else f"every one of them waits in a collective ({names})")
    return replace(watch, hung=hung, waiting=waiting, overdue=overdue, why=why,
                   collective={r: where[r] for r in waiting if where.get(r)})


def _ranks(ranks: set[int]) -> str:
    return ", ".join(map(str, sorted(ranks)))
