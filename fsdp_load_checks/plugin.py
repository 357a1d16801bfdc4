"""The pytest plugin: options from the shared table, one item per (case, check), a verdict table at the end.

Registered through the `pytest11` entry point. Items ask the session's
`fsdp_suite` for their verdict; the first item of a batch launches the
whole batch (one torchrun for many cases) and every other item, in this
or another xdist worker, reads the stored result.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fsdp_load_checks import known_issues, options, render
from fsdp_load_checks.checks import CHECKS
from fsdp_load_checks.options import OPTIONS, launch_config, parse_batch_size
from fsdp_load_checks.parent import runner, stop
from fsdp_load_checks.records import CaseResult, LaunchConfig, Outcome, Status
from fsdp_load_checks.report import judged, memory_figures


def pytest_addoption(parser):
    group = parser.getgroup("fsdp-load-checks")
    for option in OPTIONS:
        if option.pytest:
            group.addoption(option.flag, **option.kwargs())


def pytest_configure(config):
    config.addinivalue_line("markers", "fsdp_case(name): an FSDP2 loading case item")
    # SIGTERM, SIGINT, SIGHUP in the controller and in every xdist worker: end every process the run
    # started (a worker's launches; the controller's workers and all below them), then interrupt pytest
    stop.install()
    try:
        config._fsdp_launch = launch_config(config.getoption)
        config._fsdp_batch_size = parse_batch_size(config.getoption("fsdp_batch_size"))
        if config.getoption("fsdp_cases") is not None:  # a selection that matches nothing is bad input, now
            options.select_cases(config.getoption("fsdp_cases"))
    except (ValueError, KeyError) as exc:
        raise pytest.UsageError(str(exc.args[0] if exc.args else exc)) from None
    alias = options.loader_alias_note(config.getoption("loader"))
    if alias:
        config.issue_config_time_warning(pytest.PytestWarning(alias), stacklevel=2)


def is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionfinish(session):
    signum = stop.stopped_by()
    if signum is not None and not is_worker(session.config):
        session.exitstatus = stop.exit_code(signum)  # as the CLI: 128 + N


def pytest_unconfigure(config):
    signum = stop.stopped_by()
    if signum is not None and not is_worker(config):  # one line, from the process the signal was sent to
        print(f"fsdp-load-checks: stopped by {stop.signal_name(signum)}; every process the run started was ended",
              file=sys.stderr)
    stop.uninstall()


def selected_cases(config) -> list:
    try:
        return options.select_cases(config.getoption("fsdp_cases"))
    except (ValueError, KeyError) as exc:
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
        self.by_name = {c.name: c for c in self.cases}
        size = config._fsdp_batch_size or len(self.cases) or 1
        self.batch_of = {c.name: i // size for i, c in enumerate(self.cases)}
        self.results: dict[str, CaseResult] = {}

    def result(self, case: str) -> CaseResult:
        if case not in self.results:
            batch = self.batch_of[case]
            members = [c for c in self.cases if self.batch_of[c.name] == batch]
            poison = "-poison" if self.cfg.poison else ""
            key = f"{self.cfg.loader}-n{self.cfg.nnodes}x{self.cfg.nproc}{poison}-batch{batch}"
            self.results.update(runner.run_batch_once(self.root, key, members, self.cfg))
        return self.results[case]

    def outcome(self, case: str, check: str) -> Outcome:
        return known_issues.outcomes(self.result(case), self.by_name[case], self.cfg.loader)[check]

    def expect(self, case: str, check: str) -> None:
        try:
            outcome = self.outcome(case, check)
        except runner.SetupError as exc:
            pytest.fail(f"{case}: {exc}", pytrace=False)
        message = render.outcome_message(outcome)
        if outcome.status == Status.XFAILED:
            pytest.xfail(message)
        if outcome.status == Status.SKIPPED:
            pytest.skip(message)
        if outcome.status == Status.FAILED:
            details = self.result(case).verdicts[check].details
            pytest.fail(message + (f"\n\n{details}" if details else ""), pytrace=False)


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
        result = suite.results.get(case) if suite is not None else None
        if call.when == "call" and check == "memory" and result is not None and judged(result.verdicts["memory"]):
            # plain data, so it reaches the xdist controller's terminal summary
            figures = memory_figures(result.run.observations, judged=True)
            report.user_properties.append(("fsdp-memory", (case, figures)))


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
    from fsdp_load_checks.report import Row, judged_memory, memory_table, to_text, verdict_table

    terminalreporter.write_sep("=", "fsdp-load-checks verdicts (case x check)")
    terminalreporter.write_line(verdict_table(TABLE, list(CHECKS)))
    rows = [Row(case, memory=figures, memory_judged=True) for case, figures in MEMORY.items()]
    if judged_memory(rows):
        terminalreporter.write_line(to_text(memory_table(judged_memory(rows))))
