"""Cases that inject a fault into one rank, loaded through $FSDP_LOAD_CHECKS_CASE_MODULES."""

import time
from dataclasses import replace

from toy_models.zoo import TOY_CASES

BASE = next(c for c in TOY_CASES if c.name == "llama-rope")


def faulty(name: str, fault: str | None):
    return replace(BASE, name=name, guards="harness self-test", fault=fault)


def never_built():
    """A config that never comes: holds the reference process in its building stage until it is killed."""
    time.sleep(3600)


CASES = [
    faulty("fault-none-before", None),
    faulty("fault-raise", "raise@fsdp2_prepare:1"),
    faulty("fault-none-middle", None),
    faulty("fault-exit", "exit@observe:1"),
    faulty("fault-hang", "hang@observe:1"),
    faulty("fault-abort", "abort@forward:0"),
    faulty("fault-none-after", None),
    # tests/test_hangs.py: every case hangs inside accelerate's preparation (rank 1 never joins the broadcasts)
    *(faulty(f"hang-every-{i:02d}", "hang-in-accelerate@fsdp2_prepare:1") for i in range(10)),
    # tests/test_signals.py: runs held at one stage until the test signals them
    replace(faulty("signal-building", None), config=never_built),
    faulty("signal-launching", "hang@startup:0"),
    faulty("signal-midcase", "hang@observe:0"),  # rank 0: held at any --nproc
]
