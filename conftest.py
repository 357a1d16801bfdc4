"""Repository-level pytest hooks: the suite must leave no process behind."""

import psutil
import pytest


def pytest_sessionfinish(session, exitstatus):
    leftover = [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    names = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in leftover if "xdist" not in " ".join(p.cmdline())]
    if names:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            "fsdp-load-checks: processes left behind by the test run: " + "; ".join(names), red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
