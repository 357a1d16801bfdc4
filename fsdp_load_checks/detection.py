"""The detection matrix: which check catches which re-created regression (a tool, not part of a run).

    python -m fsdp_load_checks.detection [ROOT]

One batch: the fixed loader over every toy case (it must pass everything),
and beside it each regression over the fewest toy cases that show it
(`Regression.cases`), each such case as its loader variant
(`<case>~<regression>`, `Case.with_loader`): the same checkpoint and plain
load, its own loader in the ranks. One launch, not one per loader or per
accelerate config: each launch costs ~30 s of CPU in interpreters before any case
(torchrun's agent and two ranks importing torch, transformers and
accelerate). tests/test_detection.py asserts the matrix; the README prints it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from fsdp_load_checks import catalogue
from fsdp_load_checks.checks import CHECKS
from fsdp_load_checks.loaders import FIXED_LOADER
from fsdp_load_checks.loaders.regressions import REGRESSIONS
from fsdp_load_checks.parent.runner import by_loader, run_batch
from fsdp_load_checks.records import Case, CaseResult, LaunchConfig


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


def detection_cases() -> list[Case]:
    """The plan as one batch: the fixed loader's cases as themselves (it is the batch's loader), every other
    loader's as loader variants."""
    cases = []
    for loader, (names, poison) in detection_plan().items():
        chosen = catalogue.select(list(names))
        cases += chosen if loader == FIXED_LOADER else [c.with_loader(loader, poison) for c in chosen]
    return cases


def run_detection(root, nproc: int = 2, **config) -> dict[str, dict[str, CaseResult]]:
    """The whole plan in one batch (one torchrun launch, every accelerate config): loader -> {case: CaseResult},
    a variant's result under the name of the case it varies."""
    cases = detection_cases()
    results = run_batch(Path(root), cases, LaunchConfig(nproc=nproc, loader=FIXED_LOADER, **config))
    return {loader: {} for loader in detection_plan()} | by_loader(cases, results, FIXED_LOADER)


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
    print(detection_matrix_markdown(detection_matrix(run_detection(root))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
