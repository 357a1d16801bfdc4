"""The detection matrix: which check catches which re-created regression (a tool, not part of a run).

    python -m fsdp_load_checks.detection [ROOT]

One launch per loader over its planned cases: the fixed loader over every
toy case (it must pass everything), each regression over the fewest toy
cases that show it (`Regression.cases`). tests/test_detection.py asserts the
matrix; the README prints it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from fsdp_load_checks import catalogue
from fsdp_load_checks.checks import CHECKS
from fsdp_load_checks.loaders import FIXED_LOADER
from fsdp_load_checks.loaders.regressions import REGRESSIONS
from fsdp_load_checks.parent.runner import run_batch
from fsdp_load_checks.records import CaseResult, LaunchConfig


def detection_plan() -> dict[str, tuple[tuple[str, ...], bool]]:
    """loader -> (cases, poison): the fixed loader over every toy case (and its `@bf16` variant, under the
    mixed-precision config), each regression over its own cases."""
    plan = {FIXED_LOADER: (fixed_loader_cases(), False)}
    plan.update({r.name: (r.cases, r.poison) for r in REGRESSIONS})
    return plan


def fixed_loader_cases() -> tuple[str, ...]:
    from toy_models.zoo import TOY_CASES

    toy = {c.name for c in TOY_CASES}
    return tuple(name for name, case in catalogue.all_cases().items() if (case.checkpoint_of or name) in toy)


def run_detection(root, loader: str, nproc: int = 2, **config) -> dict[str, CaseResult]:
    """One torchrun launch of `loader` over its planned cases."""
    names, poison = detection_plan()[loader]
    cfg = LaunchConfig(nproc=nproc, loader=loader, poison=poison, **config)
    return run_batch(Path(root), catalogue.select(list(names)), cfg)


def crashed(result: CaseResult) -> bool:
    """The case's ranks raised or died, so every check failed on that alone (no value was compared)."""
    return bool(result.run.lost) or any(not obs.ok for obs in result.run.observations.values())


def detection_matrix(runs: dict[str, dict[str, CaseResult]]) -> dict[str, dict[str, list[str]]]:
    """loader -> check -> the cases whose verdict for that check has problems (empty: not caught).

    A case whose ranks raised or died fails every check on that alone; it is
    listed as "CASE: crash", since no value was compared.
    """
    return {
        loader: {
            check: [
                f"{case}: crash" if crashed(result) else case
                for case, result in results.items()
                if result.verdicts[check].problems
            ]
            for check in CHECKS
        }
        for loader, results in runs.items()
    }


def detection_matrix_markdown(matrix: dict[str, dict[str, list[str]]]) -> str:
    lines = [
        "| loader | " + " | ".join(CHECKS) + " |",
        "| --- | " + " | ".join("---" for _ in CHECKS) + " |",
    ]
    for loader, row in matrix.items():
        cells = [f"caught ({', '.join(row[c])})" if row[c] else "-" for c in CHECKS]
        lines.append(f"| {loader} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="fsdp-detection-"))
    runs = {loader: run_detection(root, loader) for loader in detection_plan()}
    print(detection_matrix_markdown(detection_matrix(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
