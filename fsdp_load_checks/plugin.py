"""The pytest plugin: options, one item per (case, check), a verdict table at the end.

Registered through the `pytest11` entry point. Items ask the session's
`fsdp_suite` for their verdict; the first item of a batch launches the
whole batch (one torchrun for many cases) and every other item, in this
or another xdist worker, reads the stored result.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fsdp_load_checks import cases as catalogue
from fsdp_load_checks import known_issues, loaders, runner
from fsdp_load_checks.checks import CHECKS
from fsdp_load_checks.launch import LaunchConfig
from fsdp_load_checks.options import backend_for, parse_nnodes, parse_nproc
from fsdp_load_checks.report import memory_figures


def pytest_addoption(parser):
    group = parser.getgroup("fsdp-load-checks")
    group.addoption("--nproc", default="2", help="ranks per launch (torchrun --nproc-per-node); default 2")
    group.addoption("--nnodes", type=int, default=1, help="simulate this many nodes on this machine (torchrun agents), --nproc ranks each")
    group.addoption("--loader", default="stock", help=f"loader under test: {', '.join(loaders.LOADERS)} (default stock)")
    group.addoption("--fsdp-timeout", type=float, default=120.0, help="seconds one case may take on a rank before it is killed as hung")
    group.addoption("--fsdp-startup-timeout", type=float, default=300.0, help="seconds for all ranks to start")
    group.addoption("--fsdp-cases", default=None, help="comma-separated names or globs of zoo cases to run")
    group.addoption("--fsdp-backend", default="auto", choices=("auto", "gloo", "nccl"), help="auto: nccl when every rank can own a GPU, else gloo")
    group.addoption(
        "--poison-uninitialized",
        action="store_true",
        help="fill memory handed out uninitialised during loading with NaN on every rank (memory figures are then not meaningful)",
    )
    group.addoption("--fsdp-batch-size", type=int, default=0, help="cases per torchrun launch (0: all cases of a loader in one launch)")


def launch_config(config) -> LaunchConfig:
    nproc = parse_nproc(config.getoption("--nproc"))
    loader = config.getoption("--loader")
    loaders.get(loader)
    return LaunchConfig(
        nproc=nproc,
        loader=loader,
        backend=backend_for(config.getoption("--fsdp-backend"), nproc, config.getoption("--nnodes")),
        case_timeout_s=config.getoption("--fsdp-timeout"),
        startup_timeout_s=config.getoption("--fsdp-startup-timeout"),
        poison=config.getoption("--poison-uninitialized"),
        nnodes=parse_nnodes(config.getoption("--nnodes")),
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "fsdp_case(name): an FSDP2 loading case item")
    try:
        config._fsdp_launch = launch_config(config)
    except (ValueError, KeyError) as exc:
        raise pytest.UsageError(str(exc.args[0] if exc.args else exc)) from None


def selected_cases(config) -> list[catalogue.Case]:
    try:
        return catalogue.select(pattern=config.getoption("--fsdp-cases"))
    except KeyError as exc:
        raise pytest.UsageError(str(exc.args[0])) from None


def pytest_generate_tests(metafunc):
    if "fsdp_case" in metafunc.fixturenames:
        names = [c.name for c in selected_cases(metafunc.config)]
        metafunc.parametrize("fsdp_case", names, ids=names)
    if "fsdp_check" in metafunc.fixturenames:
        metafunc.parametrize("fsdp_check", list(CHECKS), ids=list(CHECKS))


class Suite:
    """Verdicts for the session, batch by batch, shared across xdist workers through `root`."""

    def __init__(self, config, root: Path):
        self.cfg: LaunchConfig = config._fsdp_launch
        self.root = root
        self.cases = selected_cases(config)
        size = config.getoption("--fsdp-batch-size") or len(self.cases) or 1
        self.batch_of = {c.name: i // size for i, c in enumerate(self.cases)}
        self.results: dict[str, runner.CaseResult] = {}

    def result(self, case: str) -> runner.CaseResult:
        if case not in self.results:
            batch = self.batch_of[case]
            members = [c for c in self.cases if self.batch_of[c.name] == batch]
            poison = "-poison" if self.cfg.poison else ""
            key = f"{self.cfg.loader}-n{self.cfg.nnodes}x{self.cfg.nproc}{poison}-batch{batch}"
            self.results.update(runner.run_batch_once(self.root, key, members, self.cfg))
        return self.results[case]

    def outcome(self, case: str, check: str) -> known_issues.Outcome:
        return self.result(case).outcomes(catalogue.all_cases()[case], self.cfg.loader)[check]

    def expect(self, case: str, check: str) -> None:
        try:
            outcome = self.outcome(case, check)
        except runner.SetupError as exc:
            pytest.fail(f"{case}: {exc}", pytrace=False)
        if outcome.status == "xfailed":
            pytest.xfail(outcome.message)
        if outcome.status == "skipped":
            pytest.skip(outcome.message)
        if outcome.status == "failed":
            details = self.result(case).verdicts[check].details
            pytest.fail(outcome.message + (f"\n\n{details}" if details else ""), pytrace=False)


@pytest.fixture(scope="session")
def fsdp_suite(request, tmp_path_factory) -> Suite:
    base = tmp_path_factory.getbasetemp()
    # xdist workers each get base/popen-gwN; their parent is shared by the whole run
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return Suite(request.config, root / "fsdp-load-checks")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    callspec = getattr(item, "callspec", None)
    if callspec and "fsdp_case" in callspec.params and "fsdp_check" in callspec.params:
        case, check = callspec.params["fsdp_case"], callspec.params["fsdp_check"]
        report.user_properties.append(("fsdp", (case, check)))
        suite = item.funcargs.get("fsdp_suite") if hasattr(item, "funcargs") else None
        if call.when == "call" and check == "memory" and suite is not None and case in suite.results:
            # plain data, so it reaches the xdist controller's terminal summary
            report.user_properties.append(("fsdp-memory", (case, memory_figures(suite.results[case].run.observations))))


def pytest_runtest_logreport(report):
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    for key, value in report.user_properties:
        if key == "fsdp":
            status = "xfailed" if hasattr(report, "wasxfail") else report.outcome
            TABLE[tuple(value)] = status
        if key == "fsdp-memory":
            MEMORY[value[0]] = {int(r): f for r, f in value[1].items()}


TABLE: dict[tuple[str, str], str] = {}
MEMORY: dict[str, dict[int, dict[str, int]]] = {}


def pytest_terminal_summary(terminalreporter):
    if not TABLE:
        return
    from fsdp_load_checks.checks import MEMORY_MIN_MODEL_BYTES
    from fsdp_load_checks.report import Row, memory_table, render, verdict_table

    terminalreporter.write_sep("=", "fsdp-load-checks verdicts (case x check)")
    terminalreporter.write_line(verdict_table(TABLE, list(CHECKS)))
    rows = [Row(case, memory=figures) for case, figures in MEMORY.items()]
    if any(f.get("model", 0) >= MEMORY_MIN_MODEL_BYTES for row in rows for f in row.memory.values()):
        terminalreporter.write_line(render(memory_table(rows, MEMORY_MIN_MODEL_BYTES)))
