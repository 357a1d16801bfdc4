"""Renderings of a run's outcomes: the terminal tables, markdown, JSON and JUnit XML.

All take plain rows, so the pytest plugin and the CLI render the same thing,
under one rule for the terminal: the verdict table, and memory figures only
for the cases whose memory the check judged (`judged_memory`); every figure
of every case goes to the JSON report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SYMBOL = {"passed": "pass", "failed": "FAIL", "xfailed": "xfail", "skipped": "skip"}
STYLE = {"passed": "green", "failed": "bold red", "xfailed": "yellow", "skipped": "dim"}


@dataclass
class Row:
    """One case: its outcome per check, the messages behind them, and per-rank memory figures."""

    case: str
    guards: str = ""
    status: dict[str, str] = field(default_factory=dict)  # check -> passed | failed | xfailed
    messages: dict[str, str] = field(default_factory=dict)  # check -> failure / xfail message
    memory: dict[int, dict[str, int]] = field(default_factory=dict)  # rank -> phase -> committed bytes ("model": size)
    memory_judged: bool = False  # the memory check compared these figures with its bounds (see `judged`)
    # rank -> how it was prepared: accelerate config, Accelerator.prepare evidence, mixed precision (JSON only)
    preparation: dict[int, dict] = field(default_factory=dict)
    model_class: str = ""  # the class the plain load instantiated (LlamaForCausalLM, BertModel, ...)
    output: str = ""  # the output the forward check compared: logits, or last_hidden_state for a base model
    inputs: list[str] = field(default_factory=list)  # what the forward was fed: input_ids, pixel_values, ...
    # process -> phase -> wall seconds (ranks 0..N-1; -1 the reference process: "checkpoint", "reference"), JSON only
    seconds: dict[int, dict[str, float]] = field(default_factory=dict)


MEMORY_PHASES = ("from_pretrained", "fsdp2_prepare", "observe", "forward")


def memory_figures(observations: dict, judged: bool = False) -> dict[int, dict[str, int]]:
    """rank -> phase -> bytes committed at the phase's peak, plus the model's size and, when the memory check
    `judged` them, as "PHASE bound" the bytes it allowed in each phase it bounds (checks.memory_bounds)."""
    from fsdp_load_checks.checks import memory_bounds

    out = {}
    for rank, obs in sorted(observations.items()):
        figures = {"model": obs.memory.model_bytes}
        figures.update({str(p): m.committed for p, m in obs.memory.phases.items()})
        if judged:  # a skipped check (a tiny model, poisoned memory) allowed nothing: no bound to show
            figures.update({f"{p} bound": size for p, size in memory_bounds(obs.memory).items()})
        out[rank] = figures
    return out


def phase_seconds(observations: dict, reference=None) -> dict[int, dict[str, float]]:
    """process -> phase -> wall seconds (`Observation.seconds`); the reference process is -1."""
    out = {rank: dict(obs.seconds) for rank, obs in sorted(observations.items())}
    if reference is not None and reference.seconds:
        out[-1] = dict(reference.seconds)
    return out


def judged(verdict) -> bool:
    """The check compared figures with its bounds: not skipped (too small, poisoned), not blocked by a crash."""
    from fsdp_load_checks.checks import BLOCKING

    return not verdict.skipped and not any(p.kind in BLOCKING for p in verdict.problems)


def judged_memory(rows: list[Row]) -> list[Row]:
    """The rows whose memory figures the memory check judged: the only ones the terminal shows."""
    return [row for row in rows if row.memory_judged and row.memory]


def memory_table(rows: list[Row]):
    """Per case and rank: what each phase committed at its peak, in MiB and as a multiple of the model."""
    from rich.table import Table

    t = Table(header_style="bold", title="host memory committed per phase (RssAnon peak - start), MiB (x model)")
    for col in ("case", "rank", "model MiB", *MEMORY_PHASES):
        t.add_column(col, justify="left" if col == "case" else "right", no_wrap=col == "case")
    for row in rows:
        for rank, figures in sorted(row.memory.items()):
            model = figures.get("model", 0)
            cells = [
                f"{figures[p] / 2**20:.1f} ({figures[p] / model:.2f}x)" if p in figures and model else "-"
                for p in MEMORY_PHASES
            ]
            t.add_row(row.case, str(rank), f"{model / 2**20:.1f}", *cells)
    return t


def to_text(table) -> str:
    """A rich renderable as plain text (200 columns, no colour), for pytest's terminal summary."""
    from io import StringIO

    from rich.console import Console

    out = StringIO()
    Console(file=out, width=200, force_terminal=False, color_system=None).print(table)
    return out.getvalue().rstrip()


def verdict_table(table: dict[tuple[str, str], str], checks: list[str]) -> str:
    from rich.table import Table

    cases = list(dict.fromkeys(case for case, _ in table))
    t = Table(show_edge=False, header_style="bold")
    t.add_column("case")
    for check in checks:
        t.add_column(check)
    for case in cases:
        cells = []
        for check in checks:
            status = table.get((case, check), "")
            cells.append(SYMBOL.get(status, status))
        t.add_row(case, *cells)
    return to_text(t)


def rows_table(rows: list[Row], checks: list[str]):
    """A rich Table, for printing to a live console (colours kept)."""
    from rich.table import Table

    t = Table(header_style="bold")
    t.add_column("case")
    for check in checks:
        t.add_column(check)
    for row in rows:
        cells = []
        for check in checks:
            status = row.status.get(check, "")
            text = SYMBOL.get(status, "-")
            cells.append(f"[{STYLE[status]}]{text}[/]" if status in STYLE else text)
        t.add_row(row.case, *cells)
    return t


def markdown(rows: list[Row], checks: list[str], header: str = "") -> str:
    lines = [header, ""] if header else []
    lines.append("| case | " + " | ".join(checks) + " |")
    lines.append("| --- |" + " --- |" * len(checks))
    for row in rows:
        lines.append(f"| {row.case} | " + " | ".join(SYMBOL.get(row.status.get(c, ""), "-") for c in checks) + " |")
    problems = [(row, c) for row in rows for c in checks if row.messages.get(c)]
    if problems:
        lines += ["", "## Findings", ""]
        for row, check in problems:
            first, *rest = row.messages[check].splitlines()
            lines.append(f"- **{row.case} / {check}** ({SYMBOL[row.status[check]]}): {first}")
            lines += [f"  - {line}" for line in rest[:20]]
    return "\n".join(lines) + "\n"


def to_json(rows: list[Row], meta: dict) -> str:
    return json.dumps({**meta, "cases": [row.__dict__ for row in rows]}, indent=2, default=str)


def failure_lines(rows: list[Row], checks: list[str], not_run: dict[str, str]) -> list[tuple[str, str]]:
    """The CLI's failure lines as (label, text): one per case and message, and one per story for cases not run.

    Checks of a case that fail with one message (a crash fails them all alike) share a line labelled
    `case/check,check`; cases in `not_run` (case -> why) share one line per reason, labelled with their
    names, instead of one line per check of each.
    """
    lines: list[tuple[str, str]] = []
    skipped: dict[str, list[str]] = {}
    for row in rows:
        if row.case in not_run:
            skipped.setdefault(not_run[row.case], []).append(row.case)
            continue
        by_message: dict[str, list[str]] = {}
        for check in checks:
            if row.status.get(check) == "failed":
                by_message.setdefault(row.messages[check], []).append(check)
        lines += [(f"{row.case}/{','.join(failed)}", message) for message, failed in by_message.items()]
    lines += [(f"{', '.join(cases)} (every check of {len(cases)} case{'s' * (len(cases) > 1)})", why)
              for why, cases in skipped.items()]
    return lines


def junit(rows: list[Row], checks: list[str], suite_name: str = "fsdp-load-checks",
          properties: dict[str, str] | None = None) -> str:
    """JUnit XML: one testcase per (case, check); xfail as skipped, as pytest writes it; `properties` on the suite."""
    import xml.etree.ElementTree as ET

    failures = sum(r.status.get(c) == "failed" for r in rows for c in checks)
    skipped = sum(r.status.get(c) == "xfailed" for r in rows for c in checks)
    root = ET.Element("testsuite", name=suite_name, tests=str(len(rows) * len(checks)), failures=str(failures), skipped=str(skipped))
    if properties:
        props = ET.SubElement(root, "properties")
        for name, value in properties.items():
            ET.SubElement(props, "property", name=name, value=value)
    for row in rows:
        for check in checks:
            tc = ET.SubElement(root, "testcase", classname=f"fsdp_load_checks.{row.case}", name=check)
            status, message = row.status.get(check), row.messages.get(check, "")
            if status == "failed":
                ET.SubElement(tc, "failure", message=message.splitlines()[0] if message else "failed").text = message
            elif status == "xfailed":
                ET.SubElement(tc, "skipped", type="pytest.xfail", message=message.splitlines()[0] if message else "")
    return ET.tostring(root, encoding="unicode")


def write(path: str | Path, text: str) -> None:
    Path(path).write_text(text)
