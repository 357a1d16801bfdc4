"""transformers' own FSDP2 loading: `from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))`.

transformers 5.16+ shards the model itself (`transformers/distributed/`):
every rank reads its own slice of the checkpoint and `fully_shard` is
applied inside `from_pretrained`, following the model's `_fsdp_plan`; no
env flags, no broadcast from rank 0, and the Trainer skips accelerate's
wrapping for such a model. So this loader replaces both halves of the
stock path: the load (with the accelerate environment withdrawn, as a
script that never went through `accelerate launch` has it) and the
preparation (there is none: the model comes back sharded). The checks are
the same; the memory bound is its own (checks.check_memory, `shards_while_loading`):
a rank that reads only its slice may commit its shard, one full tensor in
flight and the slack during `from_pretrained`, on every rank alike.
"""

from __future__ import annotations

import os

from fsdp_load_checks.accelerate_config import without_accelerate_env

def load(model_class, checkpoint: str, dtype):
    """Every rank: its own slice of `checkpoint` as `model_class`, sharded by transformers over all the ranks
    (fsdp_size = world)."""
    import torch.distributed as dist
    from transformers.distributed import DistributedConfig

    # the accelerate config's mixed precision, as transformers' own switch (bf16 compute, fp32 reduce)
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no"
    with without_accelerate_env():
        config = DistributedConfig(fsdp_size=dist.get_world_size(), fsdp_mixed_precision=mixed)
        return model_class.from_pretrained(checkpoint, dtype=dtype, distributed_config=config)
