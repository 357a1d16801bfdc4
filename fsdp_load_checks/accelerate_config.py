"""An accelerate config file, read by accelerate's own launcher code, as the environment the ranks export.

`accelerate launch --config_file FILE` parses its command line
(`accelerate.commands.launch.launch_command_parser`), merges the YAML into
it (`_validate_launch_command`, which rejects unknown top-level keys and
bad `mixed_precision` values) and exports the FSDP settings as environment
variables (`accelerate.utils.launch.prepare_multi_gpu_env`);
`FullyShardedDataParallelPlugin()` and `Accelerator()` read them back in
every rank. We run the same three steps in the parent and keep the
`ACCELERATE_*` / `FSDP_*` variables, so the plugin a rank builds is the one
`accelerate launch` would have given it. Nothing here is our parsing of the
YAML, except the checks that the file describes the path this suite
verifies (FSDP2 with cpu_ram_efficient_loading) and that every
`fsdp_config` key is one accelerate knows (accelerate ignores unknown ones
silently).

Errors: `BadAccelerateConfig` (a ValueError), one line naming the file, the
problem and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "configs"
DEFAULT = "fsdp2"  # FSDP2, cpu_ram_efficient_loading, mixed_precision no
BF16 = "fsdp2-bf16"  # TRL's FSDP2 config: the same with bf16 mixed precision and transformer-layer wrapping
ENV_PREFIXES = ("ACCELERATE_", "FSDP_")


@contextlib.contextmanager
def without_accelerate_env() -> Iterator[None]:
    """The launch's accelerate environment (ENV_PREFIXES) withdrawn for the duration; afterwards whatever the
    body set under those prefixes is dropped and the launch's values are put back as they were."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIXES)]:
            del os.environ[key]
        os.environ.update(saved)


class BadAccelerateConfig(ValueError):
    """A config file the suite cannot use; the message is one line with the fix."""


@dataclass(frozen=True)
class AccelerateConfig:
    """A parsed config: what the ranks export, and the few fields the checks need to know."""

    name: str  # a shipped config's name, or the file's stem
    path: str
    env: dict[str, str] = field(hash=False)  # ACCELERATE_* and FSDP_* as accelerate launch exports them
    mixed_precision: str = "no"  # accelerate's: no, fp16, bf16 (fp8 is refused here)


def shipped() -> dict[str, Path]:
    """The configs this package ships, by name."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}


def resolve(name_or_path: str | None) -> Path:
    """A shipped config's name (`fsdp2`, `fsdp2-bf16`) or a path; None: the default."""
    if not name_or_path:
        return shipped()[DEFAULT]
    if name_or_path in shipped():
        return shipped()[name_or_path]
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        choices = ", ".join(shipped())
        raise BadAccelerateConfig(
            f"--accelerate-config {name_or_path}: no such file; pass an accelerate config YAML "
            f"(`accelerate config` writes one) or a shipped name: {choices}"
        )
    return path.resolve()


@functools.lru_cache(maxsize=None)
def load(name_or_path: str | None = None) -> AccelerateConfig:
    """The config at `name_or_path` (see `resolve`), parsed once per process. BadAccelerateConfig: unusable."""
    path = resolve(name_or_path)
    where = f"--accelerate-config {name_or_path or DEFAULT}"
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    known = {a.dest for a in parser._actions}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            # num_processes only shapes torchrun's command line, which the suite builds itself (--nproc)
            args = parser.parse_args(["--config_file", str(path), "--num_processes", "2", "script.py"])
            args, _, _ = _validate_launch_command(args)
    except Exception as exc:  # yaml errors, unknown keys, bad values: accelerate's own words
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadAccelerateConfig(f"{where}: accelerate cannot read it ({first}); fix the file") from None
    if not getattr(args, "use_fsdp", False):
        raise BadAccelerateConfig(
            f"{where}: distributed_type is not FSDP; this suite checks FSDP2 loading: set distributed_type: FSDP"
        )
    raw = _yaml(path)
    unknown = sorted(k for k in (raw.get("fsdp_config") or {}) if k not in known)
    if unknown:
        raise BadAccelerateConfig(
            f"{where}: unknown fsdp_config key(s) {', '.join(unknown)} (accelerate would ignore them silently); "
            "fix the spelling or remove them"
        )
    if str(getattr(args, "fsdp_version", 1)) != "2":
        raise BadAccelerateConfig(f"{where}: fsdp_version is {args.fsdp_version}; this suite checks FSDP2: set fsdp_version: 2")
    mixed_precision = str(args.mixed_precision or "no").lower()
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise BadAccelerateConfig(f"{where}: mixed_precision {mixed_precision} is not checked here; use no, bf16 or fp16")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            env = prepare_multi_gpu_env(args)
    except ValueError as exc:  # e.g. cpu_ram_efficient_loading without sync_module_states, as accelerate launch says
        raise BadAccelerateConfig(f"{where}: {str(exc).splitlines()[0]}") from None
    env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIXES)}
    if env.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() != "true":
        raise BadAccelerateConfig(
            f"{where}: fsdp_cpu_ram_efficient_loading is off; this suite checks that path: "
            "set fsdp_cpu_ram_efficient_loading: true"
        )
    return AccelerateConfig(path.stem, str(path), env, mixed_precision)


def _yaml(path: Path) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}
