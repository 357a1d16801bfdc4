"""What the parent concluded: lost ranks, problems as data, verdicts, known issues and outcomes.

Problems carry figures, not sentences: `fsdp_load_checks/render.py` turns
them into text for the reports, and known issues match their fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fsdp_load_checks.records.case import Case
from fsdp_load_checks.records.enums import (
    Against,
    LostHow,
    Phase,
    ProblemKind,
    Quantity,
    Status,
    TensorKind,
)
from fsdp_load_checks.records.observation import Failure, Observation, Reload


@dataclass
class LostRank:
    """A rank that wrote no result for a case."""

    rank: int
    case: str
    phase: Phase  # where it was last seen
    how: LostHow
    exit_code: int | None  # torchrun's summary; negative: killed by that signal
    log_tail: str
    phase_case: str = ""  # set when the rank was last seen in another case than `case`
    timeout_s: float = 0.0  # HUNG, OVERDUE: the per-case budget it overstayed; STARTUP_TIMEOUT: the start-up budget
    behind: tuple[int, ...] = ()  # BLOCKED: the ranks it was waiting for
    waited_by: tuple[int, ...] = ()  # HUNG: the ranks blocked waiting for it
    collective: str = ""  # BLOCKED: the torch function it waited in (from its stack); HUNG: where its peers waited
    why: str = ""  # OVERDUE: why its stacks cannot tell which rank is behind
    port: str = ""  # NEVER_STARTED: the rendezvous endpoint that stayed taken
    port_tries: int = 0


@dataclass(frozen=True)
class NotRun:
    """A case never launched: `hangs` launches of its batch hung in `phase` (the hang budget), `first` the first."""

    phase: Phase
    hangs: int
    first: LostRank  # the rank behind the first of those hangs, with its story


@dataclass
class CaseRun:
    """Everything the ranks left for one case."""

    case: str
    world_size: int
    observations: dict[int, Observation] = field(default_factory=dict)
    lost: list[LostRank] = field(default_factory=list)
    launch_dir: str = ""
    not_run: NotRun | None = None
    reload: Reload | None = None  # the plain reload of rank 0's save_pretrained directory, when it wrote one


@dataclass(frozen=True)
class Difference:
    """How two tensors of the same dtype and shape differ (flat indices); all zeros: no element compared."""

    mismatched: int = 0  # elements that differ (NaN against NaN counts as equal)
    numel: int = 0
    index: int = 0  # where |got - want| is largest (NaN on one side counts as infinite, on both as equal)
    got: float = 0.0
    want: float = 0.0
    sampled: int = 0  # >0: computed on this many strided elements of a tensor too big to keep
    sample_equal: bool = False  # sampled, the samples are equal, only the digests differ
    digests_only: bool = False  # no values kept on either side: only the digests differ


@dataclass(frozen=True)
class MemoryExcess:
    """A rank committed more host memory in a phase than its bound."""

    phase: Phase
    committed: int  # bytes, peak over the phase minus its start
    model_bytes: int
    bound: float  # the allowed multiple of model_bytes
    loading: bool  # the rank is its node's LOCAL_RANK 0
    source: str  # how memory was measured (RssAnon)
    terms: tuple[tuple[str, int], ...] = ()  # a bound made of named terms: (what, bytes), summed into `bound`

    @property
    def multiple(self) -> float:
        return self.committed / self.model_bytes if self.model_bytes else float("inf")


@dataclass(frozen=True)
class Problem:
    """One thing a check found wrong, as data.

    `rank` is None for the reference process. `tensor` is a parameter or
    buffer name, the forward's output ("logits" or
    "last_hidden_state", `Observation.output`), or the names of a lost tie joined by ", ".
    `quantity` says what was compared when it is not the loaded tensor itself
    (a state dict, a saved file, a gradient, the loss, ...).
    """

    check: str
    case: str
    kind: ProblemKind
    rank: int | None = None
    tensor: str = ""
    tensor_kind: TensorKind | None = None
    against: Against | None = None  # DTYPE, SHAPE, VALUES: what the rank's tensor was compared with
    got: str = ""  # DTYPE / SHAPE / LOGITS_SHAPE: the rank's value, as text
    want: str = ""  # ... the other side's
    nan: int = 0  # NON_FINITE
    inf: int = 0
    numel: int = 0
    difference: Difference | None = None  # VALUES, LOGITS
    rtol: float = 0.0  # LOGITS
    atol: float = 0.0
    memory: MemoryExcess | None = None  # MEMORY
    phase: Phase | None = None  # NO_MEMORY: the phase with no figures
    failure: Failure | None = None  # RAISED, REFERENCE_FAILED
    lost: LostRank | None = None  # LOST
    not_run: NotRun | None = None  # NOT_RUN
    quantity: Quantity | None = None  # state-dict and train-step checks: what was compared


@dataclass
class Verdict:
    """One check's finding on one case: no problems is a pass."""

    case: str
    check: str
    problems: list[Problem] = field(default_factory=list)
    details: str = ""  # long text for the report (tracebacks, log tails, notes)
    skipped: str = ""  # why this check could not judge this case (never set when a problem was found)

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Symptom:
    """The problems a known issue explains, by field; every field that is set must match.

    `tensor` is a regular expression the problem's tensor name must match in
    full; `tagged` names a case tag whose `Case.tensors` list the problem's
    tensor must be in. `when_tagged` limits the symptom to cases with that
    tag, `unless_tagged` to cases without it. `multiple` bounds a memory problem's committed / model bytes,
    low inclusive, high exclusive. `quantities` limits it to problems about
    those quantities (a gradient, a saved file, ...); `got` and `want` are
    regular expressions over the problem's own got/want text.
    """

    kinds: frozenset[ProblemKind] = frozenset()  # empty: any kind
    tensor: str | None = None
    tagged: str | None = None
    against: Against | None = None
    min_rank: int = 0
    exc_type: str | None = None  # RAISED: exact exception type and first message line
    message: str | None = None
    phase: Phase | None = None  # RAISED: where; MEMORY: which phase
    loading: bool | None = None  # MEMORY: the rank is (True) or is not (False) its node's loading rank
    multiple: tuple[float, float] | None = None
    when_tagged: str | None = None
    unless_tagged: str | None = None
    quantities: frozenset[Quantity] = frozenset()  # empty: any (Problem.quantity)
    got: str | None = None  # regular expressions Problem.got / Problem.want must match in full (DTYPE: dtypes)
    want: str | None = None


@dataclass(frozen=True)
class KnownIssue:
    """An upstream bug real on some releases, matched by its exact symptom; strict (see known_issues.py)."""

    key: str
    url: str
    title: str
    package: str
    affected: str  # PEP 440 specifier of the releases that have the bug
    selects: Callable[[Case], bool]
    symptoms: dict[str, tuple[Symptom, ...]]  # check -> symptoms, any of which explains a problem
    loaders: tuple[str, ...] = ("stock",)  # the installed stack's bugs; a patched loader must not inherit them
    # other packages the bug needs, each with its PEP 440 specifier (e.g. {"torch": ">=2.13"}): all must hold too
    also: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    """A verdict read against the known issues of the installed stack."""

    case: str
    check: str
    status: Status
    problems: list[Problem] = field(default_factory=list)  # FAILED: the unexplained ones; XFAILED: all
    issues: list[KnownIssue] = field(default_factory=list)  # the known issues that apply
    versions: dict[str, str] = field(default_factory=dict)
    skipped: str = ""

    @property
    def stale(self) -> bool:
        """Failed because a registered bug did not show: upstream fixed it."""
        return self.status == Status.FAILED and bool(self.issues) and not self.problems


@dataclass
class CaseResult:
    case: str
    run: CaseRun
    reference: Observation | None
    verdicts: dict[str, Verdict]
