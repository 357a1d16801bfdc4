"""After loading: what a user does next with the prepared model, observed on every rank.

Four phases (records.Phase), run by rank/case.py after the observe and
forward phases, each announced to the watchdog; every collective is made in
the same order on every rank, and the only rank-0-only work comes last:

  STATE_DICT          `accelerator.get_state_dict(model)`: under FSDP2, torch's
                      `get_model_state_dict(full_state_dict=True, broadcast_from_rank0=True,
                      cpu_offload=True)` (accelerate 1.15 accelerator.py): every rank takes part in
                      the gather, rank 0 alone keeps the full state dict and records it.
  SHARDED_ROUND_TRIP  accelerate's `save_fsdp_model` / `load_fsdp_model` with SHARDED_STATE_DICT
                      (what `accelerator.save_state`/`load_state` call: torch.distributed.checkpoint),
                      into a model built from the config, filled with NaN (`poisoned_model`) and prepared
                      afresh by the same `Accelerator.prepare`; rank 0 records its full state dict (the
                      entries get_state_dict gives, gathered many small shards per collective:
                      state_dicts.gathered_records).
  TRAIN_STEP          forward on the fixed batch, `accelerator.backward`, `optimizer.step()`
                      (training.py); every rank records its loss and the dtype of each tensor its
                      optimizer steps; every full gradient and every parameter after the step are
                      gathered by all and recorded by rank 0 (the same bytes on every rank).
  SAVE_PRETRAINED     rank 0: `save_pretrained(dir, state_dict=<the gathered one>)`, as the Trainer
                      and accelerate's docs do; the parent has it loaded back plain (parent/reload.py).

Work on big tensors stays bounded: records above observe.VALUE_LIMIT_BYTES
keep a digest, gradients and parameters are gathered one big tensor (or one
1 MiB group of small ones: gather.py) at a time, and the
checkpoints written here are deleted once read.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fsdp_load_checks import model_class, state_dicts, training
from fsdp_load_checks.rank.prepare import prepare
from fsdp_load_checks.records import LaunchSpec, Observation, Phase, RankTask, TrainStep

def work_dir(spec: LaunchSpec, case: str) -> Path:
    """Where this case's sharded checkpoint and save_pretrained directory go (shared by the ranks of a node)."""
    return Path(spec.out_dir) / "after" / case


def sharded_plugin(accelerator):
    """The accelerator's FSDP plugin as an accelerate config with `fsdp_state_dict_type: SHARDED_STATE_DICT`
    gives it: accelerate's `set_state_dict_type` fills the state-dict configs only when they are unset."""
    plugin = copy.copy(accelerator.state.fsdp_plugin)
    plugin.state_dict_config = plugin.optim_state_dict_config = None
    plugin.set_state_dict_type("SHARDED_STATE_DICT")
    return plugin


def poisoned_model(class_name: str, config, dtype: torch.dtype):
    """A fresh model of `config` whose every state-dict entry holds what no checkpoint does: NaN (floating),
    the dtype's minimum (integers), False (bool); whatever a sharded load leaves out shows. Built on meta and
    materialised empty, so its cost is one fill, not a random initialisation (a tenth of a case on big-llama).
    Filled in place, not drawn from freed memory: an uninitialised tensor could hold the very bytes just saved."""
    with torch.device("meta"):
        model = model_class.from_config(class_name, copy.deepcopy(config), dtype=dtype)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each name its own tensor, like model.to("meta") in fsdp2_prepare_model
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
            elif tensor.dtype == torch.bool:
                tensor.fill_(False)
            else:
                tensor.fill_(torch.iinfo(tensor.dtype).min)
    return model


def grouped_read_back(accelerator) -> bool:
    """Whether `state_dicts.gathered_records` gives what `accelerator.get_state_dict` would: accelerate's own
    method, under FSDP2, in the release whose code it mirrors (1.15: torch's get_model_state_dict, full and
    offloaded to CPU). A loader that replaces the method (the fix set's A4 casts to the loaded dtypes) is read
    back through its replacement."""
    import accelerate

    own = getattr(type(accelerator).get_state_dict, "__module__", "") == "accelerate.accelerator"
    return own and accelerator.is_fsdp2 and accelerate.__version__.startswith("1.15.")


class After:
    """The after-loading phases of one case on this rank; `phases()` yields (phase, step) in order."""

    def __init__(self, task: RankTask, spec: LaunchSpec, accelerator, device: torch.device, model, optimizer,
                 obs: Observation, tick: Callable[[], None]):
        self.task, self.spec, self.accelerator, self.device = task, spec, accelerator, device
        self.model, self.optimizer, self.obs, self.tick = model, optimizer, obs, tick
        self.dir = work_dir(spec, task.case)
        self.full: dict[str, torch.Tensor] = {}

    def phases(self) -> Iterator[tuple[Phase, Callable[[], None]]]:
        yield Phase.STATE_DICT, self.state_dict
        yield Phase.SHARDED_ROUND_TRIP, self.sharded_round_trip
        yield Phase.TRAIN_STEP, self.train_step
        yield Phase.SAVE_PRETRAINED, self.save_pretrained

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def state_dict(self) -> None:
        self.full = self.accelerator.get_state_dict(self.model)  # a collective; {} on every rank but 0
        if self.main:
            self.obs.state_dict = state_dicts.records(self.full, state_dicts.kinds_of(self.model))

    def sharded_round_trip(self) -> None:
        from accelerate.utils.fsdp_utils import load_fsdp_model, save_fsdp_model

        checkpoint = self.dir / "sharded"
        save_fsdp_model(sharded_plugin(self.accelerator), self.accelerator, self.model, str(checkpoint))
        config = self.accelerator.unwrap_model(self.model).config
        fresh = poisoned_model(self.task.model_class, config, getattr(torch, self.task.dtype))
        fresh, fresh_optimizer, _, _ = prepare(self.accelerator, fresh, self.spec.accelerate_env)
        load_fsdp_model(sharded_plugin(self.accelerator), self.accelerator, fresh, str(checkpoint))  # ends in a barrier
        if grouped_read_back(self.accelerator):
            # what get_state_dict gives rank 0 (the STATE_DICT phase runs that very call), gathered many small
            # shards per collective: one collective per tensor was a third of this phase at 8 ranks
            loaded = state_dicts.gathered_records(fresh, self.tick, keep=self.main)
        else:  # a loader's own get_state_dict (loaders/fixed.py A4), or an accelerate whose we have not read
            self.tick()
            full = self.accelerator.get_state_dict(fresh)
            loaded = state_dicts.records(full, state_dicts.kinds_of(fresh)) if self.main else {}
            del full
        if self.main:
            self.obs.round_trip = loaded
            shutil.rmtree(checkpoint, ignore_errors=True)  # every rank has read it: load_fsdp_model's last barrier
        # `prepare` registered the fresh model and optimizer with the accelerator: run_case's free_memory drops them
        del loaded, fresh, fresh_optimizer

    def train_step(self) -> None:
        model = self.model
        model.train()
        loss = training.forward_loss(model, training.batch(model, self.device))
        self.accelerator.backward(loss)
        step = TrainStep(loss=float(loss.detach().float()), loss_dtype=str(loss.dtype).removeprefix("torch."),
                         device=self.device.type)
        step.grads = training.gradients(model, self.tick, keep=self.main)
        self.optimizer.step()
        step.params = training.parameters(model, self.tick, keep=self.main)
        step.master = training.master_dtypes(model, self.optimizer)
        self.optimizer.zero_grad()
        model.eval()
        self.obs.train = step

    def save_pretrained(self) -> None:
        if self.main:
            out = self.dir / "saved"
            self.accelerator.unwrap_model(self.model).save_pretrained(out, state_dict=self.full, safe_serialization=True)
            self.obs.saved_dir = str(out)
        self.full = {}
