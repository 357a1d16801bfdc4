"""The closed vocabularies of the records: phases, tensor kinds, kinds of problem, outcome statuses.

Each is a `str` enum whose value is the word reports print, so a member
compares equal to its word, survives JSON as that word, and formats as it.
"""

from __future__ import annotations

from enum import Enum


class _Word(str, Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Phase(_Word):
    """Where a process is in a case, in the order a rank goes through them (`Phase.order`)."""

    STARTUP = "startup"
    IMPORT = "import"
    FROM_PRETRAINED = "from_pretrained"
    FSDP2_PREPARE = "fsdp2_prepare"
    OBSERVE = "observe"
    FORWARD = "forward"
    # after loading (rank/after.py): what a user does next with the prepared model
    STATE_DICT = "state_dict"  # accelerator.get_state_dict, the full state dict a save writes
    SHARDED_ROUND_TRIP = "sharded_round_trip"  # DCP save, a freshly prepared model, DCP load, gather again
    TRAIN_STEP = "train_step"  # one forward, backward and AdamW step
    SAVE_PRETRAINED = "save_pretrained"  # rank 0 writes save_pretrained(state_dict=...); no collective after it
    DONE = "done"
    EXIT = "exit"
    INIT_BUFFERS = "__init__ buffers"  # the reference process only: the model's own __init__ values
    RELOAD = "reload"  # the plain reload of rank 0's save_pretrained directory (reference/reload.py)

    @classmethod
    def of(cls, word: str) -> Phase:
        """The phase a progress file names; an unknown word (an older rank, a typo) counts as start-up."""
        return cls(word) if word in cls._value2member_map_ else cls.STARTUP

    @classmethod
    def order(cls, phase: str) -> int:
        """Position in a rank's run; unknown words (an older rank, a typo) count as start-up."""
        return _RANK_ORDER.index(phase) if phase in _RANK_ORDER else 0


_RANK_ORDER = (
    "startup", "import", "from_pretrained", "fsdp2_prepare", "observe", "forward",
    "state_dict", "sharded_round_trip", "train_step", "save_pretrained", "done", "exit",
)


class TensorKind(_Word):
    PARAMETER = "parameter"
    BUFFER = "persistent buffer"
    NON_PERSISTENT = "non-persistent buffer"


class Against(_Word):
    """What a rank's tensor was compared with."""

    RANK0 = "rank 0's"
    PLAIN_LOAD = "the single-process load"
    PLAIN_SAVE = "the single-process save_pretrained"
    PLAIN_STEP = "the single-process step"


class Quantity(_Word):
    """What the state-dict and train-step checks compared: a problem's subject beyond a loaded tensor."""

    GATHERED = "full state dict (accelerator.get_state_dict)"
    ROUND_TRIP = "full state dict after a sharded save and load (DCP)"
    SAVED = "save_pretrained file"
    RELOADED = "plain load of its save_pretrained directory"
    LOSS = "loss"
    GRADIENT = "gradient"
    STEPPED = "parameter after the step"
    MASTER = "optimizer's copy"  # the tensor the optimizer steps: fp32 master weights under mixed precision


class ProblemKind(_Word):
    """What is wrong, one word each; `Problem` carries the figures."""

    REFERENCE_FAILED = "reference-failed"  # the single-process load raised: nothing to compare with
    RAISED = "raised"  # a rank raised (Problem.failure)
    LOST = "lost"  # a rank wrote no result: hung, died, stopped (Problem.lost)
    NOT_RUN = "not-run"  # never launched: the cases before it used up the hang budget (Problem.not_run)
    NON_FINITE = "non-finite"  # NaN or Inf in a tensor or in the logits
    MISSING = "missing"  # the reference has a tensor the rank does not
    UNEXPECTED = "unexpected"  # the rank has a tensor the reference does not
    DTYPE = "dtype"
    SHAPE = "shape"
    ON_META = "on-meta"  # never materialised
    VALUES = "values"  # same dtype and shape, different bytes (Problem.difference)
    UNTIED = "untied"  # parameters tied in the reference are separate tensors on a rank
    NO_LOGITS = "no-logits"
    LOGITS_SHAPE = "logits-shape"
    LOGITS = "logits"  # logits beyond the dtype's tolerance (Problem.difference)
    NO_MEMORY = "no-memory"  # a rank recorded no memory for the phase the check bounds
    MEMORY = "memory"  # a rank committed more than its bound (Problem.memory)
    TIED_COPY = "tied-copy"  # a saved file holds a tied parameter under a second key (one copy per name)
    RELOAD_FAILED = "reload-failed"  # the plain load of a rank's save_pretrained directory raised (Problem.failure)
    LOSS = "loss"  # the training loss differs beyond tolerance (Problem.difference)


class LostHow(_Word):
    """Why a rank wrote no result, from most to least to blame (the report lists ranks in this order)."""

    HUNG = "hung"
    DIED = "died"
    OVERDUE = "overdue"  # overstayed the case budget, but the stacks cannot tell whether it hung or waited
    NEVER_STARTED = "never-started"  # the rendezvous port stayed taken
    STARTUP_TIMEOUT = "startup-timeout"
    BLOCKED = "blocked"  # waiting in a collective for a rank that hung
    STOPPED = "stopped"  # torn down after a peer failed

    @property
    def blames_a_peer(self) -> bool:
        return self in (LostHow.BLOCKED, LostHow.STOPPED)


class Status(_Word):
    """A (case, check) outcome, as pytest names them."""

    PASSED = "passed"
    FAILED = "failed"
    XFAILED = "xfailed"
    SKIPPED = "skipped"
