"""One training step on a fixed batch: the same code on every rank and in the reference process.

Every rank feeds the same batch (`batch`: token ids 0, 1, 2, ... modulo the
vocabulary, labels = input ids, or one class per sequence for a classifier), so FSDP2's average of the ranks' gradients
is the single-process gradient of that batch. The step is the one users run:
forward with `labels`, the model's own loss (or transformers'
`model.loss_function` for a model that returns none), backward, AdamW
(`LEARNING_RATE`, torch's other defaults), with `STEP_SEED` set right
before the forward so dropout draws the same masks everywhere.

`plain_step` is the reference's side. Under a mixed-precision config it
emulates torch's `MixedPrecisionPolicy` the way accelerate sets it
(param_dtype = reduce_dtype = output_dtype = the half dtype;
torch/distributed/fsdp/_fully_shard/_fsdp_api.py): the forward and backward
run on half-precision copies of the fp32 master weights, the model's
outputs are cast to output_dtype with the very function FSDP2 applies to
them, each gradient is the half-precision gradient (the average of N equal
half values is exact for N a power of two) cast back to fp32, and AdamW
steps the fp32 master weights.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from fsdp_load_checks.inputs import model_inputs
from fsdp_load_checks.observe import forward_input, primary_output, record_gathered
from fsdp_load_checks.records import TensorKind, TensorRecord, TrainStep

LEARNING_RATE = 1e-3
STEP_SEED = 1234


def batch(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """The forward check's (BATCH, SEQ) int64 ids (observe.forward_input) over the text vocabulary: the input and
    the labels."""
    return forward_input(model.config.get_text_config().vocab_size, device)


def make_optimizer(params) -> torch.optim.Optimizer:
    """The optimizer every rank and the reference step with: AdamW at LEARNING_RATE, torch's defaults otherwise."""
    return torch.optim.AdamW(params, lr=LEARNING_RATE)


def labels(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The labels the model's own loss takes: the token ids (LM heads, shifted or not by the model), or for a
    sequence classifier (`*ForSequenceClassification`; FSDP2's wrapper class keeps the suffix) one class per
    sequence, (BATCH,) int64 in [0, num_labels)."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return ids[:, 0] % model.config.num_labels
    return ids


def forward_loss(model: torch.nn.Module, ids: torch.Tensor, cast_outputs: Callable | None = None) -> torch.Tensor:
    """The scalar loss of `model` on `ids` (and `labels(model, ids)`), after seeding the RNG (dropout).

    The model's own `loss` when it computes one from `labels`; otherwise
    transformers' `model.loss_function` (ForCausalLMLoss: logits upcast to
    fp32, labels shifted, mean over tokens). A model whose forward takes no
    `labels` (a base model: `LlamaModel`, `BertModel`) gets the mean square of
    its primary output (observe.primary_output, in fp32), so every parameter
    that shapes it gets a gradient. `cast_outputs` is applied to the model's
    output first (the reference's emulation of FSDP2's output_dtype).
    """
    torch.manual_seed(STEP_SEED)
    takes_labels = "labels" in inspect.signature(model.forward).parameters
    inputs = model_inputs(model, ids)
    output = model(**inputs, labels=labels(model, ids)) if takes_labels else model(**inputs)
    if cast_outputs is not None:
        output = cast_outputs(output)
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    if not takes_labels:
        return primary_output(output)[1].float().pow(2).mean()
    return model.loss_function(logits=output.logits, labels=ids, vocab_size=model.config.get_text_config().vocab_size)


def gradients(model: torch.nn.Module, before_gather: Callable[[], None] | None = None,
              keep: bool = True) -> dict[str, TensorRecord]:
    """Every parameter's full gradient under every name it has; a parameter without a gradient has no entry.

    A DTensor is gathered whole (a collective: every rank must call this);
    the gathered bytes are the same on every rank, so ranks that pass
    `keep=False` only take part in the gather and record nothing (rank 0
    records, and no other rank hashes the model again).
    """
    return _gathered(model, lambda p: p.grad, before_gather, keep)


def parameters(model: torch.nn.Module, before_gather: Callable[[], None] | None = None,
               keep: bool = True) -> dict[str, TensorRecord]:
    """Every parameter, whole, under every name it has (a collective on ranks, like `gradients`)."""
    return _gathered(model, lambda p: p, before_gather, keep)


def _gathered(model, of: Callable, before_gather, keep: bool) -> dict[str, TensorRecord]:
    named = [(name, t) for name, param in model.named_parameters(remove_duplicate=False) if (t := of(param)) is not None]
    return record_gathered(named, lambda _: TensorKind.PARAMETER, before_gather, keep)


def master_dtypes(model: torch.nn.Module, optimizer) -> dict[str, str]:
    """name -> dtype of the tensor the optimizer steps for that parameter; absent: the optimizer does not hold it.

    `optimizer` may be accelerate's AcceleratedOptimizer (its `.optimizer` is
    the torch one); identity decides, so a parameter the optimizer lost track
    of (replaced after the optimizer was built) shows as absent.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    held = {id(p) for group in inner.param_groups for p in group["params"]}
    return {
        name: str(param.dtype).removeprefix("torch.")
        for name, param in model.named_parameters(remove_duplicate=False)
        if id(param) in held
    }


def fsdp2_output_cast(dtype: torch.dtype) -> Callable:
    """FSDP2's cast of a module's forward outputs to MixedPrecisionPolicy.output_dtype: the same helpers it calls
    (torch/distributed/fsdp/_fully_shard/_fsdp_state.py `_cast_output_dtype`), so the emulation rounds as it does."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import _cast_fp_tensor
    from torch.distributed.utils import _apply_to_tensors

    return functools.partial(_apply_to_tensors, functools.partial(_cast_fp_tensor, dtype))


def plain_step(model: torch.nn.Module, compute: torch.dtype | None = None) -> TrainStep:
    """The reference's step on a plain model; `compute` (mixed precision) is the policy's half dtype.

    `model` holds what every rank's parameters should be after preparation
    (fp32 master weights under mixed precision); it is stepped in place.
    """
    model.train()
    optimizer = make_optimizer(model.parameters())
    ids = batch(model, torch.device("cpu"))
    unique = list(model.parameters())
    masters = [p.data for p in unique]
    if compute is not None:
        for param in unique:
            if param.is_floating_point():
                param.data = param.data.to(compute)  # the unsharded parameter FSDP2 computes with (param_dtype)
    loss = forward_loss(model, ids, fsdp2_output_cast(compute) if compute is not None else None)
    loss.backward()
    if compute is not None:
        for param, master in zip(unique, masters):
            grad, param.grad = param.grad, None
            param.data = master
            if grad is not None:
                param.grad = grad.to(master.dtype)  # reduced in reduce_dtype, handed to the optimizer in the orig dtype
    step = TrainStep(loss=float(loss.detach().float()), loss_dtype=str(loss.dtype).removeprefix("torch."), device="cpu")
    step.grads = gradients(model)
    optimizer.step()
    step.params = parameters(model)
    step.master = master_dtypes(model, optimizer)
    model.eval()
    return step
