"""Many command lines of either front end in one interpreter: `main(argv)` each, with its exit status and output.

Bad-input tests need no launch, so one interpreter (torch and transformers
imported once, ~9 s of CPU) serves all of them instead of one each. The
entry points are the console script's own (`fsdp_load_checks.cli:main`) and
`pytest.main`, which loads the plugin from its entry point as the `pytest`
command does; the interpreter's real stderr must stay empty, so nothing a
library prints around the redirected streams goes unseen.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

DRIVER = r"""
import contextlib, io, json, sys
from %s import main
runs = []
for argv in json.loads(sys.stdin.read()):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
    runs.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(runs))
"""


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def run_cli(argvs: list[list[str]], timeout: float = 600, cwd=None) -> list[CliRun]:
    """`fsdp-load-checks ARGV` for each ARGV, in order, in one fresh interpreter."""
    return _run("fsdp_load_checks.cli", argvs, timeout, cwd)


def run_pytest(argvs: list[list[str]], timeout: float = 600, cwd=None) -> list[CliRun]:
    """`pytest ARGV` for each ARGV, in order, in one fresh interpreter (exit status: pytest's ExitCode)."""
    return _run("pytest", argvs, timeout, cwd)


def _run(module: str, argvs: list[list[str]], timeout: float, cwd) -> list[CliRun]:
    proc = subprocess.run([sys.executable, "-c", DRIVER % module], input=json.dumps(argvs), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return [CliRun(int(code), out, err) for code, out, err in json.loads(proc.stdout)]
