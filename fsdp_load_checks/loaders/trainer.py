"""The Trainer's wiring: `TrainingArguments` built in each rank before `from_pretrained`, under plain torchrun.

A script that trains with the Trainer under `torchrun` (no `accelerate
launch`) builds its `TrainingArguments(fsdp=True, fsdp_config={"version": 2,
"cpu_ram_efficient_loading": True})`, loads the model, then hands both to the
Trainer, which builds the `Accelerator` (and with it ACCELERATE_USE_FSDP) only
in `create_accelerator_and_postprocess`, after the load. transformers 5.x's
`TrainingArguments._process_fsdp_args` exports FSDP_CPU_RAM_EFFICIENT_LOADING
alone (training_args.py, v5.24.0 ~L2850; 4.57.6 exported ACCELERATE_USE_FSDP
too), and `is_fsdp_enabled()` needs both, so the load is not the efficient
one. This loader reproduces that order in every rank: the launch's accelerate
environment is withdrawn (nothing launched through accelerate), real
`TrainingArguments` are built, and the rank goes on to `from_pretrained`
exactly as the checks run it. Everything is put back afterwards, including
accelerate's shared state, which `TrainingArguments` resets while setting up
its device.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator

from fsdp_load_checks.accelerate_config import without_accelerate_env


@contextlib.contextmanager
def trainer_arguments() -> Iterator[None]:
    from accelerate.state import AcceleratorState, PartialState
    from transformers import TrainingArguments

    shared = copy.copy(PartialState._shared_state), copy.copy(AcceleratorState._shared_state)
    try:
        with without_accelerate_env(), tempfile.TemporaryDirectory(prefix="trainer-args-") as out:
            TrainingArguments(
                output_dir=out,
                fsdp=True,
                fsdp_config={"version": 2, "cpu_ram_efficient_loading": True},
                use_cpu=not _cuda(),
                report_to=[],
            )
            yield
    finally:
        PartialState._shared_state.clear()
        PartialState._shared_state.update(shared[0])
        AcceleratorState._shared_state.clear()
        AcceleratorState._shared_state.update(shared[1])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available() and torch.distributed.get_backend() == "nccl"
