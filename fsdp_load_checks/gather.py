"""Full tensors of a model's DTensors for observing them: small shards gathered many per collective.

FSDP2 shards every parameter (and its gradient) along dim 0 over a 1-D mesh
(`Shard(0)`, torch.chunk's split: rank r holds rows [r*c, min((r+1)*c, n)),
c = ceil(n / world size), the last ranks possibly fewer or none;
torch/distributed/fsdp/_fully_shard/_fsdp_param.py). `DTensor.full_tensor()`
gathers one tensor per collective, ~1 ms of DTensor dispatch each on CPU:
~12% of a rank's time over the real architectures (cProfile), walking every parameter three times
(observe, gradients, parameters after the step). Here the local shards of
consecutive small tensors are packed as bytes into one buffer, gathered with
one all-gather (`all_gather_single`), and cut back into the very bytes `full_tensor()`
returns. Which tensors share a collective depends only on what every rank
knows alike (shape, dtype, placements, mesh, order), so every rank makes the
same collectives. Meshes are compared by value: `fully_shard` without a mesh
(accelerate's call) builds one per module it shards, equal meshes over the
same ranks, and grouping by identity cut a model's gathers at every layer
(4x the all-gathers on the toy cases). Anything else (a tensor over
`GROUP_BYTES`, another placement, a meta tensor, a plain tensor) goes one at
a time, as before; so at most one group or one big tensor is gathered at a
time, and the observe phase's memory bound (README) holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

K = TypeVar("K")

GROUP_BYTES = 1 << 20  # a group's full bytes at most: inside the 16 MiB the observe bound allows beyond 2 tensors


def _gatherable(t: torch.Tensor) -> bool:
    """A DTensor with storage (a meta one has nothing to gather)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor) and t.device.type != "meta"


def _groupable(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import Shard

    return (
        _gatherable(t)
        and t.device_mesh.ndim == 1
        and tuple(t.placements) == (Shard(0),)
        and t.dim() > 0
        and 0 < t.numel() * t.element_size() <= GROUP_BYTES
    )


def _rows(n: int, chunk: int, rank: int) -> int:
    """Rows of dim 0 rank `rank` holds under torch.chunk's split of `n` rows in chunks of `chunk`."""
    return max(0, min(n, (rank + 1) * chunk) - rank * chunk)


def _gather_group(tensors: list) -> list[torch.Tensor]:
    """Full tensors of Shard(0) DTensors on equal 1-D meshes, with one all-gather of their bytes (the first's group)."""
    import torch.distributed as dist

    mesh = tensors[0].device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    layouts = []  # (rows, bytes per row, rows per chunk) of each tensor
    per_rank = 0
    for t in tensors:
        n = t.shape[0]
        row = t.numel() // n * t.element_size()
        chunk = -(-n // world)
        layouts.append((n, row, chunk))
        per_rank += chunk * row
    device = tensors[0].to_local().device
    send = torch.zeros(per_rank, dtype=torch.uint8, device=device)
    offset = 0
    for t, (n, row, chunk) in zip(tensors, layouts):
        local = t.to_local().detach().contiguous()
        if local.shape[0] != _rows(n, chunk, rank) or local.numel() * local.element_size() != local.shape[0] * row:
            raise RuntimeError(f"a DTensor's local shard {tuple(local.shape)} is not its Shard(0) chunk of "
                               f"{tuple(t.shape)} on rank {rank} of {world}")
        send[offset : offset + local.shape[0] * row] = local.reshape(-1).view(torch.uint8)
        offset += chunk * row
    received = torch.empty(world * per_rank, dtype=torch.uint8, device=device)
    # all_gather_single: torch 2.13's name for all_gather_into_tensor (deprecated there, the only one before)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(received, send, group=mesh.get_group())
    fulls, offset = [], 0
    for t, (n, row, chunk) in zip(tensors, layouts):
        starts = [r * per_rank + offset for r in range(world)]
        parts = [received[start : start + _rows(n, chunk, r) * row] for r, start in enumerate(starts)]
        fulls.append(torch.cat(parts).view(t.dtype).view(t.shape))
        offset += chunk * row
    return fulls


def full_tensors(items: Iterable[tuple[K, torch.Tensor]],
                 before_gather: Callable[[], None] | None = None) -> Iterator[tuple[K, torch.Tensor]]:
    """(key, full tensor) for each (key, tensor) of `items`, in order; a collective on ranks: every rank must
    walk the same items. A DTensor is gathered whole (bit-equal to `full_tensor()`), a meta DTensor or a
    plain tensor is passed through as it is. `before_gather` is called before each collective (the rank's
    progress tick, for the watchdog). RuntimeError if a Shard(0) DTensor's local shard is not its chunk.
    """
    pending: list[tuple[K, torch.Tensor]] = []
    pending_bytes = 0

    def flush() -> Iterator[tuple[K, torch.Tensor]]:
        nonlocal pending, pending_bytes
        if before_gather:
            before_gather()
        with torch.no_grad():
            fulls = _gather_group([t for _, t in pending])
        out = [(key, full) for (key, _), full in zip(pending, fulls)]
        pending, pending_bytes = [], 0
        yield from out

    for key, t in items:
        if _groupable(t):
            nbytes = t.numel() * t.element_size()
            if pending and (pending_bytes + nbytes > GROUP_BYTES or t.device_mesh != pending[0][1].device_mesh):
                yield from flush()
            pending.append((key, t))
            pending_bytes += nbytes
            continue
        if pending:
            yield from flush()
        if _gatherable(t):
            if before_gather:
                before_gather()
            yield key, t.full_tensor()
        else:
            yield key, t
    if pending:
        yield from flush()
