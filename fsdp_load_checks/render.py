"""Problems, verdicts and outcomes as text: the one place sentences are made.

Checks and known issues deal in `Problem` records; the reports, the pytest
items and the CLI call these functions. Lines read
"CASE: rank R KIND NAME ..." so a failure names the case, the rank and the
tensor even when pasted alone.
"""

from __future__ import annotations

import signal

from fsdp_load_checks.checks import BLOCKING, plain_load_notes
from fsdp_load_checks.records import (
    CaseRun,
    Difference,
    Failure,
    LostHow,
    LostRank,
    NotRun,
    Observation,
    Outcome,
    Phase,
    Problem,
    ProblemKind,
    Quantity,
    Status,
    Verdict,
)

MiB = 1 << 20


def failure_line(failure: Failure) -> str:
    return f"rank {failure.rank} raised {failure.exc_type}: {failure.message} (during {failure.phase})"


def _ranks(ranks: tuple[int, ...]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _blocked(lost: LostRank) -> str:
    where = f" in {lost.collective}" if lost.collective else ""
    if not lost.behind:
        return f"was blocked{where} (killed)"
    return f"was blocked waiting for {_ranks(lost.behind)}{where} (killed)"


def lost_line(lost: LostRank) -> str:
    """rank R <how> during PHASE of CASE[, exit code C (SIGNAL)][ (who waited for it, or why nobody is blamed)]."""
    how = {
        LostHow.HUNG: f"hung for more than {lost.timeout_s:g}s (killed; Python stacks in its log)",
        LostHow.OVERDUE: f"overstayed {lost.timeout_s:g}s (killed; Python stacks in its log)",
        LostHow.BLOCKED: _blocked(lost),
        LostHow.NEVER_STARTED: (
            f"never started: rendezvous port {lost.port} was in use {lost.port_tries} times in a row "
            "(another program is binding ports as fast as we pick them; free some ports or retry)"
        ),
        LostHow.STARTUP_TIMEOUT: f"did not start within {lost.timeout_s:g}s",
        LostHow.DIED: "died",
        LostHow.STOPPED: "was stopped after a peer failed",
    }[lost.how]
    phase = f"{lost.phase}" if lost.phase_case in ("", lost.case) else f"{lost.phase} (of {lost.phase_case})"
    code = "" if lost.exit_code is None else f", exit code {lost.exit_code}"
    signame = ""
    if lost.exit_code is not None and lost.exit_code < 0:
        try:
            signame = f" ({signal.Signals(-lost.exit_code).name})"
        except ValueError:
            pass
    after = ""
    if lost.how == LostHow.HUNG and lost.waited_by:
        where = f" in {lost.collective}" if lost.collective else ""
        after = f" ({_ranks(lost.waited_by)} waiting for it{where})"
    elif lost.how == LostHow.OVERDUE:
        after = f"; the stacks cannot tell which rank is behind: {lost.why}"
    return f"rank {lost.rank} {how} during {phase} of {lost.case}{code}{signame}{after}"


def not_run_text(not_run: NotRun) -> str:
    return (f"not run: the previous {not_run.hangs} cases hung in {not_run.phase}; "
            f"the first: {lost_line(not_run.first)}")


def difference_text(d: Difference, numel: int) -> str:
    if d.digests_only:
        return "digests differ"
    if d.sample_equal:
        core = "sample equal, bytes differ"
    elif d.numel == 0:
        core = "contents differ"
    else:
        core = f"{d.mismatched}/{d.numel} elements differ, max |diff| at [{d.index}]: {d.got:.6g} vs {d.want:.6g}"
    if d.sampled:
        return f"sampled {d.sampled} of {numel} elements (tensor too big to keep): {core}"
    return core


def _memory_text(p: Problem) -> str:
    m = p.memory
    role = "the loading rank (LOCAL_RANK 0)" if m.loading else "a rank that only receives rank 0's weights"
    if m.terms and m.phase == Phase.FROM_PRETRAINED:  # only a loader that shards while loading bounds it by terms
        role = "a rank that reads only its own slice"
    if m.terms:
        terms = " + ".join(f"{what} {size / MiB:.1f}" for what, size in m.terms)
        return (
            f"committed {m.committed / MiB:.1f} MiB ({m.multiple:.2f}x the {m.model_bytes / MiB:.1f} MiB model) "
            f"during {m.phase}; {role} may commit at most {m.bound * m.model_bytes / MiB:.1f} MiB = {terms} "
            f"({m.source}, peak over the phase)"
        )
    return (
        f"committed {m.committed / MiB:.1f} MiB ({m.multiple:.2f}x the {m.model_bytes / MiB:.1f} MiB model) "
        f"during {m.phase}; {role} may commit at most {m.bound:g}x ({m.source}, peak over the phase)"
    )


def _plural(output: str, one: str, many: str) -> str:
    """The forward's output with its verb: "logits differ", "last_hidden_state differs"."""
    return f"{output} {many if output == 'logits' else one}"


def _non_finite_text(p: Problem) -> str:
    subject = f"{p.tensor_kind} {p.tensor} has" if p.tensor_kind else _plural(p.tensor, "has", "have")
    return f"{subject} {p.nan} NaN and {p.inf} Inf of {p.numel}"


# kind -> what follows "rank R " (the rank's own problems)
_RANK_TEXT = {
    ProblemKind.NON_FINITE: _non_finite_text,
    ProblemKind.MISSING: lambda p: f"has no {p.tensor_kind} {p.tensor} (the reference has it)",
    ProblemKind.UNEXPECTED: lambda p: f"has {p.tensor_kind} {p.tensor} that the reference does not have",
    ProblemKind.DTYPE: lambda p: f"{p.tensor_kind} {p.tensor} has dtype {p.got}, {p.against} has {p.want}",
    ProblemKind.SHAPE: lambda p: f"{p.tensor_kind} {p.tensor} has shape {p.got}, {p.against} has {p.want}",
    ProblemKind.ON_META: lambda p: f"{p.tensor_kind} {p.tensor} is still on the meta device (never materialised)",
    ProblemKind.VALUES: lambda p: (
        f"{p.tensor_kind} {p.tensor} differs from {p.against}: {difference_text(p.difference, p.numel)}"
    ),
    ProblemKind.UNTIED: lambda p: f"parameters {p.tensor} are no longer tied",
    ProblemKind.NO_LOGITS: lambda p: f"produced no {p.tensor}",
    ProblemKind.LOGITS_SHAPE: lambda p: f"{p.tensor} shape {p.got}, reference {p.want}",
    ProblemKind.LOGITS: lambda p: (
        f"{_plural(p.tensor, 'differs', 'differ')} from the single-process load beyond rtol={p.rtol:g} atol={p.atol:g}: "
        f"{difference_text(p.difference, p.numel)}"
    ),
    ProblemKind.NO_MEMORY: lambda p: f"recorded no memory for {p.phase}",
    ProblemKind.MEMORY: _memory_text,
}


def _tolerance(p: Problem) -> str:
    return f" beyond rtol={p.rtol:g} atol={p.atol:g}" if p.rtol or p.atol else ""


def _quantity_text(p: Problem) -> str:
    """A state-dict or train-step problem: "rank R <quantity> ..." ."""
    q = p.quantity
    subject = f"{p.tensor_kind} {p.tensor}" if p.tensor_kind else p.tensor
    if q == Quantity.MASTER:
        if p.kind == ProblemKind.MISSING:
            return f"rank {p.rank} optimizer does not hold {subject} ({p.against}'s does)"
        return f"rank {p.rank} optimizer steps {subject} in {p.got}, {p.against} in {p.want}"
    if p.kind == ProblemKind.LOSS:
        return f"rank {p.rank} loss differs from {p.against}{_tolerance(p)}: {p.difference.got:.7g} vs {p.difference.want:.7g}"
    if q == Quantity.LOSS and p.kind == ProblemKind.MISSING:
        return f"rank {p.rank} recorded no training step"
    if p.kind == ProblemKind.RELOAD_FAILED:
        if p.failure is None:
            return f"rank {p.rank} left no save_pretrained directory to load back"
        return (f"the plain load of rank {p.rank}'s save_pretrained directory raised {p.failure.exc_type}: "
                f"{p.failure.message}")
    if q == Quantity.GRADIENT:
        where, what = f"rank {p.rank}", f"gradient of {subject}"
    elif q == Quantity.STEPPED:
        where, what = f"rank {p.rank}", f"{subject} after the step"
    else:
        where, what = f"rank {p.rank} {q}:", subject
    if p.kind == ProblemKind.MISSING:
        return f"{where} has no {what} ({p.against} has it)"
    if p.kind == ProblemKind.UNEXPECTED:
        return f"{where} has {what}, which {p.against} does not have"
    if p.kind == ProblemKind.TIED_COPY:
        return f"{where} holds {what} as a second copy of tied {p.got} ({p.against} stores the tie once)"
    if p.kind == ProblemKind.DTYPE:
        return f"{where} {what} has dtype {p.got}, {p.against} has {p.want}"
    if p.kind == ProblemKind.SHAPE:
        return f"{where} {what} has shape {p.got}, {p.against} has {p.want}"
    if p.kind == ProblemKind.ON_META:
        return f"{where} {what} is on the meta device"
    return f"{where} {what} differs from {p.against}{_tolerance(p)}: {difference_text(p.difference, p.numel)}"


def problem_text(p: Problem) -> str:
    """One problem as a sentence, without the case prefix."""
    if p.quantity is not None:
        return _quantity_text(p)
    if p.kind == ProblemKind.REFERENCE_FAILED:
        why = failure_line(p.failure) if p.failure else "no reference observation"
        return f"the single-process reference load failed: {why}"
    if p.kind == ProblemKind.RAISED:
        return failure_line(p.failure)
    if p.kind == ProblemKind.LOST:
        return lost_line(p.lost)
    if p.kind == ProblemKind.NOT_RUN:
        return not_run_text(p.not_run)
    return f"rank {p.rank} {_RANK_TEXT[p.kind](p)}"


def problem_line(p: Problem) -> str:
    """The problem as a report line: "CASE: ..."."""
    return f"{p.case}: {problem_text(p)}"


def lines(verdict: Verdict) -> list[str]:
    return [problem_line(p) for p in verdict.problems]


def note_line(p: Problem) -> str:
    """A plain-load note (checks.plain_load_notes): the reference itself differs from the model's __init__."""
    if p.kind == ProblemKind.ON_META:
        detail = "still on the meta device"
    elif p.kind == ProblemKind.SHAPE:
        detail = f"shape {p.got} vs {p.want}"
    elif p.kind == ProblemKind.DTYPE:
        detail = f"dtype {p.got} vs {p.want}"
    else:
        detail = difference_text(p.difference, p.numel)
    return (
        f"note: the single-process load itself leaves {p.tensor_kind} {p.tensor} unlike the model's __init__ value "
        f"(transformers restores it only if _init_weights recomputes it; the check compares with __init__'s): {detail}"
    )


def details(verdict: Verdict, run: CaseRun, ref: Observation | None) -> str:
    """The long text behind a failed verdict: tracebacks and log tails of a crash, or the plain-load notes."""
    out = []
    for p in verdict.problems:
        if p.kind == ProblemKind.REFERENCE_FAILED and p.failure:
            out.append(p.failure.traceback)
        elif p.kind == ProblemKind.RAISED:
            out.append(f"--- rank {p.rank} traceback ---\n{p.failure.traceback}")
        elif p.kind == ProblemKind.LOST:
            out.append(f"--- rank {p.lost.rank} log tail ({run.launch_dir}) ---\n{p.lost.log_tail}")
        elif p.kind == ProblemKind.RELOAD_FAILED and p.failure and p.failure.traceback:
            out.append(f"--- plain reload of rank {p.rank}'s save_pretrained directory ---\n{p.failure.traceback}")
    if any(p.kind in BLOCKING for p in verdict.problems):  # a crash: nothing was compared, no note applies
        return "\n".join(out)
    if verdict.check == "buffers" and verdict.problems and ref is not None:
        return "\n".join(note_line(n) for n in plain_load_notes(ref))
    return ""


def outcome_message(outcome: Outcome) -> str:
    """The text pytest and the reports show for an outcome ("" for a pass)."""
    if outcome.status == Status.SKIPPED:
        return outcome.skipped
    if outcome.status == Status.PASSED:
        return ""
    issues = outcome.issues
    if outcome.stale:
        keys = ", ".join(f"{k.key} ({k.url})" for k in issues)
        installed = ", ".join(f"{k.package} {outcome.versions.get(k.package)}" for k in issues)
        return (
            f"{outcome.case}/{outcome.check} passed but is registered as known issue {keys} for {installed}: "
            "upstream fixed it, narrow the entry's version range in known_issues.py (strict xfail)"
        )
    text = "\n".join(problem_line(p) for p in outcome.problems)
    if outcome.status == Status.XFAILED:
        return f"known issue {issues[0].key} ({issues[0].url}): {problem_line(outcome.problems[0])}"
    if issues:
        return text + f"\n(known issue {', '.join(k.key for k in issues)} applies, but the lines above are not its symptom)"
    return text
