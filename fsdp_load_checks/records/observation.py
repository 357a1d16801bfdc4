"""What a process saw in its model: the records a rank (or the reference process) writes for the parent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fsdp_load_checks.records.enums import Phase, TensorKind

if TYPE_CHECKING:  # field values only; this layer never imports torch
    import torch


@dataclass
class TensorRecord:
    """One parameter or buffer under one of its names.

    `digest` decides equality (sha256 of the raw bytes, so equal digests mean
    bit-equal tensors, and "meta" for a tensor never materialised); `value`
    or `sample` only describe a difference.
    """

    name: str
    kind: TensorKind
    dtype: str  # torch dtype without the "torch." prefix
    shape: tuple[int, ...]
    device: str
    nan: int
    inf: int
    digest: str
    value: torch.Tensor | None  # the full tensor on CPU, up to observe.VALUE_LIMIT_BYTES
    sample: torch.Tensor | None = None  # evenly strided elements, for bigger tensors

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Failure:
    """An exception a process raised, with the phase it was in; rank -1 is the reference process."""

    rank: int
    phase: Phase
    exc_type: str
    message: str  # the exception's first line
    traceback: str


@dataclass
class PhaseMemory:
    """Host memory over one phase, in bytes (RssAnon: anonymous resident pages)."""

    start: int
    end: int
    peak: int  # highest sample in between
    cuda_peak: int | None = None  # torch.cuda.max_memory_allocated in the phase

    @property
    def committed(self) -> int:
        """What the phase added at its worst: the figure the memory check bounds."""
        return max(self.peak - self.start, 0)


@dataclass
class MemoryProfile:
    source: str = "RssAnon"
    model_bytes: int = 0  # size of the checkpoint's safetensors files
    local_rank: int = 0  # transformers' loading rank is LOCAL_RANK 0 (one per node)
    poisoned: bool = False  # uninitialised memory was NaN-filled: figures are inflated, the check is skipped
    phases: dict[str, PhaseMemory] = field(default_factory=dict)  # Phase value -> figures
    # after preparation, the terms of the fsdp2_prepare bound (bytes; checks.preparation_bound)
    shard_bytes: int = 0  # this rank's local shards of the prepared parameters, as FSDP2 stores them, and its buffers
    largest_tensor_bytes: int = 0  # the largest full prepared parameter: one broadcast receive buffer
    # an uneven split only (0 when every sharded dim divides by the world size); rank/prepare.prepared_sizes
    padded_chunk_bytes: int = 0  # the most a tensor's padded short chunks add to the one in flight
    repadded_bytes: int = 0  # this rank's short shards, copied into padded storage at the end of loading
    upcast_bytes: int = 0  # under mixed precision, fp32 master copies of 16-bit parameters (the whole model)
    # the loader shards while loading (each rank reads its slice: loaders/native.py), so from_pretrained is
    # bounded by the shard terms on every rank, and there is no preparation (checks.check_memory)
    shards_while_loading: bool = False
    trace: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    marks: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, phase that began)


@dataclass
class TrainStep:
    """One forward, backward and AdamW step on a fixed batch, as a process saw it (training.py).

    Records are keyed by every name a parameter is registered under (tied
    names each get one), gathered whole on ranks and kept by rank 0 only (the
    gathered bytes are the same on every rank); above
    observe.VALUE_LIMIT_BYTES only digests and samples are kept.
    """

    loss: float = float("nan")  # the loss the backward started from, as a Python float (exact for fp32/bf16/fp16)
    loss_dtype: str = ""
    grads: dict[str, TensorRecord] = field(default_factory=dict)  # the full gradient; absent: no gradient (rank 0)
    params: dict[str, TensorRecord] = field(default_factory=dict)  # every parameter after optimizer.step() (rank 0)
    master: dict[str, str] = field(default_factory=dict)  # name -> dtype of the tensor the optimizer steps
    device: str = "cpu"  # where it ran: the train-step tolerance depends on it (checks.train_step_tolerance)


@dataclass
class Reload:
    """What a plain single-process `from_pretrained` found in a rank's save_pretrained directory (parent/reload.py)."""

    saved: dict[str, TensorRecord] = field(default_factory=dict)  # the safetensors files' tensors, as stored
    state_dict: dict[str, TensorRecord] = field(default_factory=dict)  # the loaded model's state_dict()
    failure: Failure | None = None


@dataclass
class Observation:
    """Everything one process recorded for one case; rank -1 is the single-process reference."""

    case: str
    rank: int
    world_size: int
    tensors: dict[str, TensorRecord] = field(default_factory=dict)
    ties: list[tuple[str, ...]] = field(default_factory=list)  # names sharing one parameter
    logits: torch.Tensor | None = None  # the primary output, float32: (batch, seq, vocab) logits or (batch, seq, hidden)
    logits_dtype: str = ""  # reference only: the dtype logits were computed in under mixed precision ("": the model's)
    missing_keys: tuple[str, ...] = ()  # reference only: keys the checkpoint did not have
    # reference only: non-persistent buffers whose plain-load value differs from the model's own
    # __init__ value (the plain-load record is kept here; `tensors` holds the __init__ value)
    init_mismatch: dict[str, TensorRecord] = field(default_factory=dict)
    # reference only: the class the checkpoint loaded as, and which of its outputs `logits` holds
    # ("logits", or "last_hidden_state" for a base model without a head)
    model_class: str = ""
    output: str = "logits"
    inputs: tuple[str, ...] = ("input_ids",)  # reference only: what the forward is fed (inputs.model_inputs keys)
    after_loading: bool = True  # ranks: False when the case's after-loading steps were not run (Case.after_loading)
    memory: MemoryProfile = field(default_factory=MemoryProfile)  # ranks only
    failure: Failure | None = None
    versions: dict[str, str] = field(default_factory=dict)  # package -> version
    # ranks only: how the model was prepared, read back from accelerate's bookkeeping (rank/prepare.py):
    # call, registered_model, optimizer, is_fsdp2, fsdp_module, mixed_precision, device; and the config's name
    preparation: dict[str, object] = field(default_factory=dict)
    # after loading (rank/after.py; the state-dict and train-step checks). Ranks: rank 0's full state dict as
    # accelerator.get_state_dict gathers it, and again after a sharded save/load round trip (other ranks keep
    # none); the reference: the plain load's state_dict() in the dtype it was loaded in.
    state_dict: dict[str, TensorRecord] = field(default_factory=dict)
    round_trip: dict[str, TensorRecord] = field(default_factory=dict)  # ranks only
    saved: dict[str, TensorRecord] = field(default_factory=dict)  # reference only: what its save_pretrained wrote
    saved_dir: str = ""  # rank 0 only: the directory its save_pretrained wrote (reloaded by the parent)
    train: TrainStep | None = None
    # wall seconds this process spent in each phase of the case (Phase values; ranks: rank/memory.Sampler,
    # plus "startup" on a launch's first case: process start to the first case, torch import and rendezvous
    # included; the reference: "checkpoint", building it, and "reference", its plain load and observation)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failure is None
