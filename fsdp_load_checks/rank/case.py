"""One case on one rank: loader under test -> `from_pretrained` -> FSDP2 prepare -> observe -> forward -> after.

"After" is what a user does next with the prepared model (rank/after.py): the full state dict, a sharded
save/load round trip, one training step, save_pretrained.

After each case the ranks compare notes through the rendezvous store: if
one failed and the others did not (or cannot answer), continuing could
leave collectives mismatched, so the rank exits non-zero, torchrun stops its
peers, and the parent relaunches the cases left.
"""

from __future__ import annotations

import gc
import os
import time
from datetime import timedelta

from fsdp_load_checks.records import LaunchSpec, Observation, Phase, RankTask


class PathNotExercised(RuntimeError):
    """transformers would not take the cpu_ram_efficient_loading branch: every rank would load the whole model.

    With the stock or fixed loader this is a bug of the suite (the env flags were lost); with a loader that
    wires the path the way a user's script does (`trainer-args`), it is the finding.
    """


def assert_path_under_test() -> None:
    """transformers must see FSDP + cpu_ram_efficient_loading, or every check passes vacuously.

    `is_fsdp_enabled()` (transformers modeling_utils) needs ACCELERATE_USE_FSDP and
    FSDP_CPU_RAM_EFFICIENT_LOADING both true and a process group. A plugin built with explicit
    arguments rewrites the flags (see prepare.fresh_plugin); this catches that, and anything like it,
    on every case, on every rank.
    """
    from transformers.modeling_utils import is_fsdp_enabled

    if not is_fsdp_enabled():
        flags = ", ".join(f"{k}={os.environ.get(k)!r}" for k in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"))
        raise PathNotExercised(
            f"transformers does not see FSDP with cpu_ram_efficient_loading (is_fsdp_enabled() is False; {flags}): "
            "every rank would load the whole checkpoint itself"
        )


def run_case(task: RankTask, spec: LaunchSpec, accelerator, device, progress) -> Observation:
    """Everything this rank observed for one case; an exception is recorded with its phase, never raised."""
    import torch

    from fsdp_load_checks import loaders, observe
    from fsdp_load_checks.catalogue import import_all
    from fsdp_load_checks.checkpoints import model_bytes
    from fsdp_load_checks.model_class import loadable
    from fsdp_load_checks.poison import poisoned
    from fsdp_load_checks.rank.after import After
    from fsdp_load_checks.rank.memory import Sampler
    from fsdp_load_checks.rank.prepare import prepare, prepared_sizes
    from fsdp_load_checks.records import MemoryProfile

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    obs = Observation(case=task.case, rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    obs.versions = observe.stack_versions()
    obs.preparation = {"config": spec.accelerate_config}
    loader_name = task.loader or spec.loader  # a loader variant (records.Case.with_loader) brings its own
    poison = spec.poison or task.poison
    obs.memory = MemoryProfile(model_bytes=model_bytes(task.checkpoint), local_rank=local_rank, poisoned=poison)
    phase = Phase.IMPORT
    model = optimizer = after = None
    try:
        with Sampler(obs.memory, cuda=device.type == "cuda", seconds=obs.seconds) as memory:
            memory.phase(phase)  # the case's imports: lazy modeling code is paid here, outside from_pretrained
            import_all(tuple(task.imports))
            model_class = loadable(task.model_class, task.checkpoint)  # modeling code imported before the baseline
            # everything alive now (torch, transformers, accelerate, the modeling code) lives for the launch: out of
            # the collector's reach, the full collection after each case walks only what the case made (1.3 s -> ms)
            gc.freeze()
            loader = loaders.get(loader_name)
            with loader.patch():
                phase = Phase.FROM_PRETRAINED
                progress(phase, task.case, task.fault)
                memory.phase(phase)
                if loader.load is not None:  # it shards while loading: every rank reads its slice, no preparation
                    torch.manual_seed(task.seed)  # keys missing from the checkpoint: each rank draws what the reference draws
                    with poisoned(True):  # every rank loads: each one's uninitialised memory is NaN
                        model = loader.load(model_class, task.checkpoint, getattr(torch, task.dtype))
                    obs.preparation.update({"call": "from_pretrained(distributed_config)", "loader": loader_name})
                    obs.memory.shards_while_loading = True
                    sizes = prepared_sizes(model)  # the sharded-load bound: shard and largest only
                    obs.memory.shard_bytes = sizes["shard_bytes"]
                    obs.memory.largest_tensor_bytes = sizes["largest_tensor_bytes"]
                else:
                    assert_path_under_test()
                    torch.manual_seed(task.seed)  # keys missing from the checkpoint: rank 0 draws what the reference draws
                    with poisoned(local_rank == 0 or poison):  # the loading rank (one per node)
                        model = model_class.from_pretrained(task.checkpoint, dtype=getattr(torch, task.dtype))
                    branch = loaders.load_branch(model)  # which transformers branch this rank took, where known
                    if branch:
                        obs.preparation["branch"] = branch
                    phase = Phase.FSDP2_PREPARE
                    progress(phase)
                    memory.phase(phase)
                    model, optimizer, how, sizes = prepare(accelerator, model, spec.accelerate_env)
                    obs.preparation.update(how)
                    for name, value in sizes.items():
                        setattr(obs.memory, name, value)
            phase = Phase.OBSERVE
            progress(phase)
            memory.phase(phase)
            obs.tensors, obs.ties = observe.observe_tensors(model, before_gather=progress.tick)
            phase = Phase.FORWARD
            progress(phase)
            memory.phase(phase)
            obs.logits = observe.forward_logits(model, device)
            obs.after_loading = task.after_loading
            if loader.load is None and task.after_loading:  # saving and training as accelerate does them
                after = After(task, spec, accelerator, device, model, optimizer, obs, progress.tick)
                with loader.patch():  # a loader's fixes reach the saves and the fresh preparation
                    for phase, step in after.phases():
                        progress(phase)
                        memory.phase(phase)
                        step()
    except Exception as exc:  # recorded with the rank and phase; the parent decides
        obs.failure = observe.failure_from(exc, rank, phase)
    finally:
        started = time.monotonic()
        del model, optimizer, after
        accelerator.free_memory()  # drops the references Accelerator.prepare keeps
        gc.collect()
        obs.seconds["cleanup"] = round(time.monotonic() - started, 4)
    return obs


def in_step(obs: Observation, index: int, spec: LaunchSpec) -> bool:
    """True when every rank ended case `index` the same way (all fine, or all raised the same).

    Statuses go through the rendezvous store, not a collective: a peer stuck
    in a broadcast never answers, and a rank that failed gives up after
    `control_timeout_s` instead of waiting for the process-group timeout.
    """
    import torch.distributed as dist

    from fsdp_load_checks import observe

    store = dist.distributed_c10d._get_default_store()
    mine = "ok" if obs.ok else f"{obs.failure.exc_type}@{obs.failure.phase}"
    keys = [f"fsdp-load-checks/status/{index}/{r}" for r in range(dist.get_world_size())]
    if obs.failure is not None and observe.peer_gone(obs.failure):
        # a peer left in the middle of a collective: the process group is broken whatever the peers say (its
        # RuntimeError may even match the one that peer raised, when the peer gave up waiting before we wrote)
        store.set(keys[dist.get_rank()], "peer-gone")
        return False
    store.set(keys[dist.get_rank()], mine)
    try:
        store.wait(keys, timedelta(seconds=spec.case_timeout_s if obs.ok else spec.control_timeout_s))
    except Exception:
        return False
    return all(store.get(k).decode() == mine for k in keys)
