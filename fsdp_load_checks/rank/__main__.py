"""Entry point of one rank, started by torchrun: `python -m fsdp_load_checks.rank SPEC_JSON`.

Runs the launch's batch of cases in order and writes one result file per
(case, rank), atomically; ends with `os._exit` once the results are flushed.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

from fsdp_load_checks.rank.case import in_step, run_case
from fsdp_load_checks.rank.progress import Progress
from fsdp_load_checks.records import LaunchSpec, Phase
from fsdp_load_checks.records.protocol import EXIT_DIVERGED, log_path, result_path

PG_TIMEOUT_MARGIN_S = 60.0


def main(argv: list[str]) -> None:
    spec = LaunchSpec.load(Path(argv[0]))
    out_dir = Path(spec.out_dir)
    rank = int(os.environ["RANK"])
    log = open(log_path(out_dir, rank), "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    progress = Progress(out_dir, rank)
    # a harness self-test may hold a rank here, before torch is imported (`hang@startup:R` on the first case)
    progress(Phase.STARTUP, "", spec.tasks[0].fault if spec.tasks else None)

    import psutil
    import torch
    import torch.distributed as dist

    from fsdp_load_checks import observe
    from fsdp_load_checks.rank.prepare import export_env, make_accelerator, remake_accelerator

    if spec.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # longer than the parent's per-case watchdog, so a hang is reported by the parent, naming the rank behind,
    # rather than as a collective timeout on the rank that was waiting for it
    dist.init_process_group(spec.backend, timeout=timedelta(seconds=spec.case_timeout_s + PG_TIMEOUT_MARGIN_S))
    export_env(spec.accelerate_env)  # what `accelerate launch --config_file` would have exported
    if not spec.tasks:
        # an empty launch only proves the rendezvous: every rank waits until all are connected, or the first
        # to finish exits while a slower peer still connects to it (gloo: "Connection closed by peer" there)
        dist.barrier()
    accelerator = make_accelerator(device, spec.accelerate_env) if spec.tasks else None

    # process start (interpreter, torch import, rendezvous, Accelerator) to the first case: paid once per launch
    startup_s = time.time() - psutil.Process().create_time()
    code = 0
    env = spec.accelerate_env
    for index, task in enumerate(spec.tasks):
        task_spec = spec.for_task(task)  # a case under its own accelerate config (records.Case.under)
        if task_spec.accelerate_env != env:
            accelerator = remake_accelerator(device, env, task_spec.accelerate_env)
            env = task_spec.accelerate_env
        obs = run_case(task, task_spec, accelerator, device, progress)
        if index == 0:
            obs.seconds = {"startup": round(startup_s, 4), **obs.seconds}
        observe.write(obs, str(result_path(out_dir, task.case, rank)))
        progress(Phase.DONE, task.case)
        if not in_step(obs, index, spec):
            code = EXIT_DIVERGED
            break
    progress(Phase.EXIT)
    sys.stdout.flush()
    sys.stderr.flush()
    log.flush()
    # interpreter teardown after gloo occasionally aborts (SIGABRT); the results are already on disk
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
