"""gather.full_tensors: the bytes `DTensor.full_tensor()` gives, several small shards per collective.

The multi-rank equivalence is what every zoo case checks (parameters, gradients and buffers bit-equal to
the plain load, `uneven-shards` included); here, the split it assumes and the byte packing of every dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from fsdp_load_checks import gather, observe
from fsdp_load_checks.records import TensorKind


@given(n=st.integers(1, 300), world=st.integers(1, 16))
def test_rows_are_torch_chunks_split_over_ranks(n, world):
    chunks = [c.shape[0] for c in torch.arange(n).chunk(world)]
    chunks += [0] * (world - len(chunks))  # torch.chunk may give fewer chunks than ranks: the last hold nothing
    chunk = -(-n // world)
    assert [gather._rows(n, chunk, r) for r in range(world)] == chunks


def test_grouped_gather_gives_full_tensor_bytes_for_every_dtype(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        g = torch.Generator().manual_seed(0)
        plain = {
            "f32": torch.randn(5, 3, generator=g),
            "bf16": torch.randn(7, generator=g).bfloat16(),
            "i64": torch.arange(6).view(3, 2),
            "bool": torch.rand(4, 2, generator=g) > 0.5,
            "big": torch.randn(gather.GROUP_BYTES // 4 + 1, generator=g),  # over a group: gathered alone
        }
        other = init_device_mesh("cpu", (1,))  # what fully_shard builds per module: equal, not the same object
        assert other is not mesh and other == mesh
        meshes = [mesh, other] * len(plain)
        items = [(k, distribute_tensor(v, m, [Shard(0)])) for (k, v), m in zip(plain.items(), meshes)]
        items.append(("plain", torch.ones(2)))  # passed through
        ticks = []
        out = dict(gather.full_tensors(items, before_gather=lambda: ticks.append(1)))
        assert list(out) == [*plain, "plain"]
        for k, v in plain.items():
            assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
        assert len(ticks) == 2  # one collective for the four small tensors (two meshes, equal), one for the big one
        with pytest.raises(TypeError, match="gather it first"):  # a record is of full tensors only
            observe.record("f32", TensorKind.PARAMETER, items[0][1])
    finally:
        dist.destroy_process_group()


def test_state_dict_records_gathered_in_groups_are_get_state_dicts(tmp_path):
    """state_dicts.gathered_records (the round trip's read-back) against torch's get_model_state_dict with
    accelerate 1.15 get_state_dict's options: the same keys, dtypes and bytes, a tied parameter under
    both names, the persistent buffer, no non-persistent one; a meta entry recorded, not a crash."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from fsdp_load_checks import state_dicts

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(7, 4)
            self.inner = torch.nn.Linear(4, 4).to(torch.bfloat16)
            self.head = torch.nn.Linear(4, 7, bias=False)
            self.head.weight = self.embed.weight  # tied
            self.register_buffer("bias_correction", torch.arange(3.0))  # persistent
            self.register_buffer("inv_freq", torch.ones(2), persistent=False)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Net()
        fully_shard(model.inner)
        fully_shard(model)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        want = state_dicts.records(get_model_state_dict(model, options=options), state_dicts.kinds_of(model))
        got = state_dicts.gathered_records(model)
        assert sorted(got) == sorted(want) == ["bias_correction", "embed.weight", "head.weight", "inner.bias",
                                               "inner.weight"]
        for name in want:
            assert (got[name].kind, got[name].dtype, got[name].digest) == (want[name].kind, want[name].dtype,
                                                                             want[name].digest), name
        model.register_buffer("on_meta", torch.empty(2, device="meta"))  # a buffer a loader left unmaterialised
        with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):  # rank 0's crash
            get_model_state_dict(model, options=options)
        assert state_dicts.gathered_records(model)["on_meta"].digest == "meta"  # the finding, named
        assert state_dicts.gathered_records(model, keep=False) == {}  # takes part, records nothing
    finally:
        dist.destroy_process_group()
