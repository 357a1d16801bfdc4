"""The plain load: `from_pretrained` with no FSDP, no env flags; what "correct" means for every rank."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from fsdp_load_checks import model_class, observe
from fsdp_load_checks.catalogue import import_all
from fsdp_load_checks.poison import poisoned
from fsdp_load_checks.records import Case, Observation, Phase, TensorKind
from fsdp_load_checks.reference import after
from fsdp_load_checks.tensors import init_non_persistent, set_tensor


MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def upcast_trainable(model: torch.nn.Module) -> None:
    """What accelerate's `fsdp2_prepare_model` (1.14+) does under mixed precision: fp32 master weights.

    Every trainable parameter that is not float32 becomes float32
    (`param.data = param.data.to(torch.float32)`, accelerate
    utils/fsdp_utils.py); exact, so the ranks' prepared parameters must equal
    these bit for bit.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


def cast_for_compute(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """FSDP2's MixedPrecisionPolicy(param_dtype=dtype): parameters cast for the forward, buffers left alone."""
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)


def observe_plain(case: Case, path: Path, mixed_precision: str = "no") -> Observation:
    """The single-process observation (rank -1), with each non-persistent buffer at its `__init__` value.

    Loaded with the case's class (`Case.model_class`), as every rank loads it;
    records the concrete class and which output the forward check compares.

    Under a mixed-precision accelerate config (`mixed_precision` bf16/fp16)
    it is the plain load as accelerate's preparation leaves it: parameters
    upcast to fp32 master weights (`upcast_trainable`), and logits computed
    with parameters cast to the policy's param_dtype and returned in it
    (accelerate's FSDP2 policy sets param_dtype = reduce_dtype =
    output_dtype), with `logits_dtype` naming it so the forward check uses
    that dtype's tolerance.

    transformers 5 restores non-persistent buffers only through
    `_init_weights`; where even this load loses one, the record is kept in
    `init_mismatch` and `tensors` holds the value the model's `__init__`
    computes (tensors.init_non_persistent), so the checks judge ranks
    against what the model's author meant.
    """
    import_all(case.imports)
    obs = Observation(case=case.name, rank=-1, world_size=1, versions=observe.stack_versions())
    dtype = getattr(torch, case.dtype)
    phase = Phase.FROM_PRETRAINED
    try:
        cls = model_class.resolve(case.model_class)
        torch.manual_seed(case.seed)  # keys missing from the checkpoint draw what rank 0 draws
        with poisoned():
            model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True)
        obs.model_class = type(model).__name__
        obs.missing_keys = tuple(sorted(info.get("missing_keys", ())))
        dtypes = after.loaded_dtypes(model)
        compute = MIXED_PRECISION_DTYPES.get(mixed_precision)
        if compute is not None:
            upcast_trainable(model)
        phase = Phase.OBSERVE
        obs.tensors, obs.ties = observe.observe_tensors(model)
        phase = Phase.INIT_BUFFERS
        for name, value in init_non_persistent(type(model), model.config, dtype).items():
            want = observe.record(name, TensorKind.NON_PERSISTENT, value)
            got = obs.tensors.get(name)
            if got is not None and got.digest != want.digest:
                obs.init_mismatch[name] = got  # what the plain load gave; the intended value replaces it
                obs.tensors[name] = want
                set_tensor(model, name, want.value.clone())  # so the reference logits are right too
        prepared = copy.deepcopy(model) if compute is not None else model  # what ranks hold; the forward casts `model`
        phase = Phase.FORWARD
        if compute is not None:
            cast_for_compute(model, compute)
            obs.logits_dtype = str(compute).removeprefix("torch.")
        obs.output, obs.logits = observe.forward_output(model, torch.device("cpu"), output_dtype=compute)
        obs.inputs = tuple(observe.forward_inputs(model, torch.device("cpu")))
        if case.after_loading:
            for phase, step in after.steps(obs, prepared, dtypes, compute):  # state dict, save, training step
                step()
    except Exception as exc:  # recorded: the parent reports it against the case
        obs.failure = observe.failure_from(exc, -1, phase)
    return obs
