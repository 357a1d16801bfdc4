"""`fsdp-load-checks`: the suite from a shell, for the zoo or for your own checkpoint.

Exit status: 0 every check passed (known upstream issues count as expected),
1 a check failed, 2 usage or environment error (one line on stderr),
128 + N stopped by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP): every process
the run started is ended, the reports asked for hold the cases complete by
then, marked incomplete, and stderr gets one line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input: printed as one line naming the problem and the fix."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_common(p: argparse.ArgumentParser, command: str) -> None:
    from fsdp_load_checks.options import OPTIONS

    for option in OPTIONS:
        if option.cli and (command == "zoo" or option.dest != "fsdp_cases"):
            p.add_argument(*option.cli_flags, **option.kwargs())
    p.add_argument("--json", metavar="FILE", help="write every outcome and message as JSON")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML (one testcase per case x check)")
    p.add_argument("--markdown", metavar="FILE", help="write the table and findings as markdown")
    p.add_argument("--plot-memory", metavar="DIR", help="write a PNG per case: memory over time per rank, phases marked")
    p.add_argument("--work-dir", metavar="DIR", help="where checkpoints, references and rank logs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (rank logs) after the run")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fsdp-load-checks", description="Verify FSDP2 + cpu_ram_efficient_loading, rank by rank.")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    zoo = sub.add_parser("zoo", help="every zoo case against the installed stack (the default)")
    add_common(zoo, "zoo")
    check = sub.add_parser("check", help="your checkpoint directory (config.json + *.safetensors)")
    check.add_argument("path", help="directory written by save_pretrained")
    check.add_argument("--dtype", help="dtype to load in (default: the config's dtype, else float32)")
    check.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                       help="module that registers the architecture with the Auto classes (repeatable)")
    check.add_argument("--model-class", metavar="NAME",
                       help="class to load with: an Auto class (AutoModel, AutoModelForSequenceClassification, ...) "
                            "or a class name (default: the one config.json names in architectures)")
    add_common(check, "check")
    sub.add_parser("list", help="the cases, loaders and checks, one line each")
    return parser


def writable(path: str | None, flag: str) -> None:
    if path is None:
        return
    parent = Path(path).expanduser().resolve().parent
    if Path(path).is_dir():
        raise UsageError(f"{flag} {path} is a directory; pass a file path, e.g. {Path(path) / 'report'}")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {parent} does not exist; create it or pick another path")
    if not os.access(parent, os.W_OK) or (Path(path).exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable; pick a path you can write")


def launch_config(args):
    from fsdp_load_checks.options import launch_config as from_options
    from fsdp_load_checks.options import loader_alias_note

    try:
        cfg = from_options(lambda dest: getattr(args, dest))
    except (ValueError, KeyError) as exc:
        raise UsageError(str(exc.args[0])) from None
    note = loader_alias_note(args.loader)
    if note:
        print(f"fsdp-load-checks: note: {note}", file=sys.stderr)
    return cfg


def select_cases(args):
    from fsdp_load_checks import catalogue, checkpoints, model_class

    if args.command == "check":
        for module in args.imports:
            try:
                __import__(module)
            except ImportError as exc:
                raise UsageError(f"--import {module}: cannot import it ({exc}); install it or fix the name") from None
        try:
            path, dtype = checkpoints.validate(args.path)
        except checkpoints.BadCheckpoint as exc:
            raise UsageError(str(exc)) from None
        if args.dtype:
            import torch

            if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
                raise UsageError(f"--dtype {args.dtype} is not a torch dtype; use e.g. float32, bfloat16, float16")
            dtype = args.dtype
        try:
            cls = model_class.named_in(path, args.model_class)
        except model_class.UnknownModelClass as exc:
            raise UsageError(str(exc)) from None
        spec = [{"name": path.name or "checkpoint", "path": str(path), "dtype": dtype, "imports": args.imports,
                 "model_class": cls}]
        os.environ[catalogue.USER_CHECKPOINTS_ENV] = json.dumps(spec)  # reaches the reference and every rank
        return catalogue.user_cases()
    from fsdp_load_checks.options import select_cases as from_options

    try:
        return from_options(args.fsdp_cases)
    except (ValueError, KeyError) as exc:
        raise UsageError(str(exc.args[0])) from None


def list_everything() -> int:
    from fsdp_load_checks import catalogue, loaders
    from fsdp_load_checks.checks import CHECK_MEANING

    print("checks:")
    for name, meaning in CHECK_MEANING.items():
        print(f"  {name:<28} {meaning}")
    print("loaders:")
    for loader in loaders.LOADERS.values():
        print(f"  {loader.name:<28} {loader.summary}")
    for alias, target in loaders.ALIASES.items():
        print(f"  {alias:<28} alias of {target}, kept for one release")
    print("cases:")
    for case in catalogue.all_cases().values():
        print(f"  {case.name:<28} {case.guards}")
    return EXIT_OK


def run(args) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from fsdp_load_checks import report
    from fsdp_load_checks.checks import CHECK_MEANING
    from fsdp_load_checks.parent import runner, stop

    cfg = launch_config(args)
    for flag in ("json", "junit", "markdown"):
        writable(getattr(args, flag), f"--{flag}")
    if args.plot_memory:
        try:
            Path(args.plot_memory).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--plot-memory {args.plot_memory}: cannot create it ({exc.strerror})") from None
    selected = select_cases(args)
    console = Console(stderr=True)
    root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fsdp-load-checks-"))
    root.mkdir(parents=True, exist_ok=True)
    checks = list(CHECK_MEANING)
    stopped = None
    try:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        # no bar when stderr is not a terminal (CI logs): rich would still end it with an empty line
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
            task = progress.add_task(f"{len(selected)} case(s) x {cfg.nproc} rank(s), loader {cfg.loader}", total=len(selected) * cfg.world_size)
            results = runner.run_batch(root, selected, cfg, on_progress=lambda case, rank: progress.advance(task))
    except runner.SetupError as exc:
        console.print(f"[bold red]error:[/] {str(exc).splitlines()[0]}")
        return EXIT_USAGE
    except stop.Stopped as exc:  # every process the run started is gone; report what was complete
        stopped, results = exc, exc.results
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)

    done = [case for case in selected if case.name in results]
    rows = report_rows(done, results, cfg.loader)
    failed = any(s == "failed" for row in rows for s in row.status.values())
    meta = {"loader": cfg.loader, "nproc": cfg.nproc, "nnodes": cfg.nnodes, "backend": cfg.backend,
            "accelerate_config": cfg.accelerate_config, "passed": not failed}
    if stopped is not None:
        why = f"stopped by {stop.signal_name(stopped.signum)}"
        meta.update(passed=False, complete=False, stopped=why, unfinished=[c.name for c in selected if c not in done])
        note = f"incomplete: {why}, {len(done)} of {len(selected)} case(s) ran"
        written = write_reports(args, rows, checks, meta, cfg, note=note)
        where = f", in {', '.join(written)} (marked incomplete)" if written else ""
        print(f"fsdp-load-checks: {why}; every process the run started was ended; "
              f"{len(done)} of {len(selected)} case(s) complete{where}", file=sys.stderr)
        return stop.exit_code(stopped.signum)

    out = Console()
    out.print(report.rows_table(rows, checks))
    judged = report.judged_memory(rows)
    if judged:
        out.print(report.memory_table(judged))
    for label, text in failure_lines(done, results, rows, checks):
        out.print(f"[bold red]FAIL[/] {label}: " + text.replace("\n", "\n    "), highlight=False)
    write_reports(args, rows, checks, meta, cfg)
    if args.plot_memory:
        from fsdp_load_checks.plot import PlotUnavailable, plot_memory

        try:
            for case in selected:
                path = plot_memory(case.name, results[case.name].run.observations, Path(args.plot_memory), cfg.loader)
                out.print(f"memory plot: {path}")
        except PlotUnavailable as exc:
            raise UsageError(str(exc)) from None
    counts = {s: sum(row.status.get(c) == s for row in rows for c in checks) for s in ("passed", "xfailed", "failed")}
    not_run = sum(len(checks) for case in done if results[case.name].run.not_run)
    out.print(f"{counts['passed']} passed, {counts['xfailed']} known upstream issue(s), {counts['failed']} failed"
              + (f" ({not_run} of them not run)" if not_run else ""))
    return EXIT_FAILED if failed else EXIT_OK


def report_rows(cases, results: dict, loader: str) -> list:
    """One report row per case: outcomes against the known issues, messages, memory figures."""
    from fsdp_load_checks import known_issues, render, report

    rows = []
    for case in cases:
        result = results[case.name]
        outcomes = known_issues.outcomes(result, case, loader)
        messages = {c: render.outcome_message(o) for c, o in outcomes.items()}
        judged = report.judged(result.verdicts["memory"])
        rows.append(report.Row(
            case=case.name,
            guards=case.guards,
            status={c: str(o.status) for c, o in outcomes.items()},
            messages={c: m for c, m in messages.items() if m},
            memory=report.memory_figures(result.run.observations, judged),
            memory_judged=judged,
            preparation={r: o.preparation for r, o in sorted(result.run.observations.items())},
            model_class=result.reference.model_class if result.reference else "",
            output=result.reference.output if result.reference else "",
            inputs=list(result.reference.inputs) if result.reference else [],
            seconds=report.phase_seconds(result.run.observations, result.reference),
        ))
    return rows


def failure_lines(cases, results: dict, rows: list, checks: list[str]) -> list[tuple[str, str]]:
    """The FAIL lines: checks failing alike share one, so do cases not run for one reason (report.failure_lines)."""
    from fsdp_load_checks import render, report

    not_run = {c.name: render.not_run_text(results[c.name].run.not_run) for c in cases if results[c.name].run.not_run}
    return report.failure_lines(rows, checks, not_run)


def write_reports(args, rows, checks: list[str], meta: dict, cfg, note: str = "") -> list[str]:
    """The reports asked for (--json, --junit, --markdown); `note` marks them (e.g. incomplete). Returns their paths."""
    from fsdp_load_checks import report

    written = []
    if args.json:
        report.write(args.json, report.to_json(rows, meta))
        written.append(args.json)
    if args.junit:
        report.write(args.junit, report.junit(rows, checks, properties={"note": note} if note else None))
        written.append(args.junit)
    if args.markdown:
        header = (f"# fsdp-load-checks: loader {cfg.loader}, {cfg.nnodes} node(s) x {cfg.nproc} ranks ({cfg.backend}), "
                  f"accelerate config {cfg.accelerate_config}")
        report.write(args.markdown, report.markdown(rows, checks, header + (f"\n\n**{note}**" if note else "")))
        written.append(args.markdown)
    return written


def main(argv: list[str] | None = None) -> int:
    from fsdp_load_checks.parent import stop

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "zoo")
    stop.install()  # SIGTERM, SIGINT, SIGHUP: end every process the run started, report, exit 128 + N
    try:
        args = build_parser().parse_args(argv)
        if args.command == "list":
            return list_everything()
        return run(args)
    except UsageError as exc:
        print(f"fsdp-load-checks: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head`
        return EXIT_OK
    except stop.Stopped as stopped:  # before any case ran (run() reports the ones complete itself)
        print(f"fsdp-load-checks: {stopped}; every process the run started was ended", file=sys.stderr)
        return stop.exit_code(stopped.signum)
    except Exception as exc:  # a bug of ours: one line, the traceback on request
        if os.environ.get("FSDP_LOAD_CHECKS_DEBUG"):
            raise
        print(
            f"fsdp-load-checks: internal error: {type(exc).__name__}: {exc}; rerun with FSDP_LOAD_CHECKS_DEBUG=1 "
            "for the traceback and report it",
            file=sys.stderr,
        )
        return EXIT_USAGE
    finally:
        stop.uninstall()


if __name__ == "__main__":
    sys.exit(main())
