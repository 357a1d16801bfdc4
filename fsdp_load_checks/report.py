"""Human-readable renderings of verdicts: the terminal table."""

from __future__ import annotations

SYMBOL = {"passed": "pass", "failed": "FAIL", "xfailed": "xfail", "skipped": "skip"}


def verdict_table(table: dict[tuple[str, str], str], checks: list[str]) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    cases = list(dict.fromkeys(case for case, _ in table))
    t = Table(show_edge=False, header_style="bold")
    t.add_column("case")
    for check in checks:
        t.add_column(check)
    style = {"passed": "green", "failed": "bold red", "xfailed": "yellow"}
    for case in cases:
        cells = []
        for check in checks:
            status = table.get((case, check), "")
            cells.append(f"[{style.get(status, '')}]{SYMBOL.get(status, status)}[/]" if status in style else status)
        t.add_row(case, *cells)
    out = StringIO()
    Console(file=out, width=200, force_terminal=False, color_system=None).print(t)
    return out.getvalue().rstrip()
