"""The option table both front ends are built from: same names, same parsing, same defaults.

The pytest plugin registers every `Option` with `parser.addoption`, the CLI
with `add_argument` (argparse underneath both), under the same flags; the
CLI also accepts its older spellings (`cli_aliases`) for one release. Values
arrive as strings and are parsed here, once, by `launch_config`, so a bad
value gets the same one line from either front end: what is wrong and what
to pass instead (ValueError or KeyError; the front ends turn it into exit 2
or a pytest usage error).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fsdp_load_checks import accelerate_config, catalogue, loaders
from fsdp_load_checks.records import LaunchConfig


@dataclass(frozen=True)
class Option:
    flag: str  # the same in both front ends
    help: str
    default: Any = None
    action: str | None = None  # "store_true" for switches
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    cli_aliases: tuple[str, ...] = ()  # older CLI spellings, kept for one release
    cli: bool = True  # offered by the CLI (`zoo` and `check`)
    pytest: bool = True  # offered by the pytest plugin
    cli_flag: str | None = None  # the CLI's spelling where it differs (pytest's flags carry an fsdp- prefix)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return (self.cli_flag or self.flag, *self.cli_aliases)

    def kwargs(self) -> dict:
        out = {"dest": self.dest, "default": self.default, "help": self.help}
        for key in ("action", "choices", "metavar"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


OPTIONS = [
    Option("--nproc", "ranks per node (torchrun --nproc-per-node); default 2", "2", metavar="N"),
    Option("--nnodes", "simulate this many nodes on this machine (one torchrun agent each), --nproc ranks each",
           "1", metavar="N"),
    Option("--loader", f"loader under test: {', '.join(loaders.LOADERS)} (default stock: the installed stack)",
           "stock", metavar="NAME"),
    Option("--fsdp-cases", "comma-separated case names or globs (default: every zoo case)", metavar="GLOBS",
           cli_aliases=("--cases",)),
    Option("--fsdp-timeout", "seconds a launch may go with no rank making progress (a new case, phase or "
           "collective) before it is killed as hung (120)", "120",
           metavar="S", cli_aliases=("--timeout",)),
    Option("--fsdp-startup-timeout", "seconds for every rank to start (300)", "300", metavar="S",
           cli_aliases=("--startup-timeout",)),
    Option("--fsdp-hang-budget",
           "after this many launches of a batch hang in the same phase, the cases left are reported not run "
           "instead of launched (2)", "2", metavar="K"),
    Option("--fsdp-backend", "auto: nccl when every rank can own a GPU, else gloo", "auto",
           choices=("auto", "gloo", "nccl"), cli_aliases=("--backend",)),
    Option("--poison-uninitialized",
           "NaN-fill memory handed out uninitialised during loading, on every rank (memory is then not measured)",
           False, action="store_true"),
    Option("--fsdp-accelerate-config",
           "accelerate config YAML (what `accelerate launch --config_file` reads) or a shipped name: "
           f"{', '.join(accelerate_config.shipped())} (default {accelerate_config.DEFAULT})",
           accelerate_config.DEFAULT, metavar="FILE", cli_flag="--accelerate-config"),
    Option("--fsdp-batch-size", "cases per torchrun launch (0: all cases of a loader in one launch)", "0",
           metavar="N", cli=False),
]


def whole_number(raw, flag: str, minimum: int = 1, hint: str = "") -> int:
    """`raw` as an int of at least `minimum`; ValueError names the flag, what it got and `hint`."""
    try:
        value = int(str(raw), 10)
    except ValueError:
        kind = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise ValueError(f"{flag} must be {kind}, got {raw!r}{hint}") from None
    if value < minimum:
        raise ValueError(f"{flag} must be at least {minimum}, got {value}{hint}")
    return value


def parse_nproc(raw) -> int:
    value = whole_number(raw, "--nproc", hint=": pass the ranks per node, e.g. --nproc 2")
    cores = os.cpu_count() or 1
    if value > 64 * cores:
        raise ValueError(f"--nproc {value} is far more ranks than this machine's {cores} cores can run; use at most {8 * cores}")
    return value


def parse_nnodes(raw) -> int:
    return whole_number(raw, "--nnodes")


def parse_seconds(raw, flag: str) -> float:
    try:
        value = float(str(raw))
    except ValueError:
        raise ValueError(f"{flag} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{flag} must be positive seconds, got {value:g}")
    if not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number of seconds, got {value:g}; a hang would never end")
    return value


def parse_batch_size(raw) -> int:
    return whole_number(raw, "--fsdp-batch-size", minimum=0, hint=" (0: all cases in one batch)")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def backend_for(choice: str, nproc: int, nnodes: int = 1) -> str:
    """nccl only when every rank can own a GPU; gloo (CPU) otherwise. Simulated nodes share this machine's GPUs."""
    gpus = gpu_count()
    nproc = nproc * nnodes
    if choice == "nccl" and gpus < nproc:
        raise ValueError(
            f"--fsdp-backend nccl needs one GPU per rank: --nproc {nproc} but {gpus} GPU(s) visible; "
            f"use --nproc {max(gpus, 1)} or --fsdp-backend gloo"
        )
    if choice == "auto":
        return "nccl" if gpus >= nproc else "gloo"
    return choice


def select_cases(pattern: str | None) -> list:
    """The zoo cases `--fsdp-cases` names (all when None); ValueError when a pattern matches none."""
    selected = catalogue.select(pattern=pattern)
    if not selected:
        raise ValueError(f"--fsdp-cases {pattern!r} matches no case; run `fsdp-load-checks list`")
    return selected


def loader_alias_note(name: str) -> str:
    """One line when `--loader` names an old alias ("" otherwise): the run goes on under the new name."""
    if name in loaders.ALIASES:
        return (f"--loader {name} is the old name of --loader {loaders.ALIASES[name]}; it runs that loader, "
                "and the old name will be removed after one release")
    return ""


def launch_config(get: Callable[[str], Any]) -> LaunchConfig:
    """The launch configuration from option values; `get(dest)` reads one (pytest's getoption, argparse's args)."""
    nproc = parse_nproc(get("nproc"))
    nnodes = parse_nnodes(get("nnodes"))
    return LaunchConfig(
        nproc=nproc,
        loader=loaders.canonical(get("loader")),
        backend=backend_for(get("fsdp_backend"), nproc, nnodes),
        case_timeout_s=parse_seconds(get("fsdp_timeout"), "--fsdp-timeout"),
        startup_timeout_s=parse_seconds(get("fsdp_startup_timeout"), "--fsdp-startup-timeout"),
        poison=bool(get("poison_uninitialized")),
        nnodes=nnodes,
        accelerate_config=get("fsdp_accelerate_config") or accelerate_config.DEFAULT,
        accelerate_env=accelerate_config.load(get("fsdp_accelerate_config")).env,
        hang_budget=whole_number(get("fsdp_hang_budget"), "--fsdp-hang-budget",
                                 hint=": pass how many hangs in one phase end a batch, e.g. --fsdp-hang-budget 2"),
    )
