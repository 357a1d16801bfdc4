"""The single-process reference: a plain `from_pretrained` with no FSDP, no env flags.

Run as a module in a fresh interpreter per batch (`python -m
fsdp_load_checks.reference ROOT CASE...`) so no distributed state, env flag
or loader patch of the parent or the ranks can leak into what "correct" means.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fsdp_load_checks import checkpoints, observe
from fsdp_load_checks.cases import Case, all_cases, import_all
from fsdp_load_checks.poison import poisoned


def reference_path(root: Path, case_name: str) -> Path:
    return root / "reference" / f"{case_name}.pt"


def intended_non_persistent(path: Path, dtype: torch.dtype) -> dict[str, observe.TensorRecord]:
    """Non-persistent buffers as the model's own `__init__` computes them (parameters left on meta).

    transformers 5 builds models on meta and restores such buffers only
    through `_init_weights`; a buffer it forgets is left uninitialised even
    in a plain load. This is the value the model's author meant.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        eager = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = observe.non_persistent_names(eager)
    return {
        name: observe.record(name, observe.NON_PERSISTENT, buf)
        for name, buf in eager.named_buffers(remove_duplicate=False)
        if name in names and buf.device.type != "meta"
    }


def observe_plain(case: Case, path: Path) -> observe.Observation:
    from transformers import AutoModelForCausalLM

    import_all(case.imports)
    obs = observe.Observation(case=case.name, rank=-1, world_size=1, versions=observe.stack_versions())
    dtype = getattr(torch, case.dtype)
    phase = "from_pretrained"
    try:
        torch.manual_seed(case.seed)  # keys missing from the checkpoint draw what rank 0 draws
        with poisoned():
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
        obs.missing_keys = tuple(sorted(info.get("missing_keys", ())))
        phase = "observe"
        obs.tensors, obs.ties = observe.observe_tensors(model)
        phase = "__init__ buffers"
        for name, want in intended_non_persistent(path, dtype).items():
            got = obs.tensors.get(name)
            if got is not None and got.digest != want.digest:
                obs.init_mismatch[name] = got  # what the plain load gave; the intended value replaces it
                obs.tensors[name] = want
                observe.set_tensor(model, name, want.value.clone())  # so the reference logits are right too
        phase = "forward"
        obs.logits = observe.forward_logits(model, torch.device("cpu"))
    except Exception as exc:  # recorded: the parent reports it against the case
        obs.failure = observe.failure_from(exc, -1, phase)
    return obs


def materialize(root: Path, cases: list[Case]) -> None:
    """Checkpoints first (the launch needs them), then the references."""
    from filelock import FileLock

    for case in cases:
        checkpoints.build(root, case)
    for case in cases:
        out = reference_path(root, case.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out) + ".lock"):
            if not out.exists():
                observe.write(observe_plain(case, checkpoints.checkpoint_dir(root, case)), str(out))


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    root, names = Path(argv[0]), argv[1:]
    catalogue = all_cases()
    materialize(root, [catalogue[n] for n in names])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
