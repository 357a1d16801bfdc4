"""Cases that inject a fault into one rank, loaded through $FSDP_LOAD_CHECKS_CASE_MODULES."""

from dataclasses import replace

from toy_models.zoo import TOY_CASES

BASE = next(c for c in TOY_CASES if c.name == "llama-rope")


def faulty(name: str, fault: str | None):
    return replace(BASE, name=name, guards="harness self-test", fault=fault)


CASES = [
    faulty("fault-none-before", None),
    faulty("fault-raise", "raise@fsdp2_prepare:1"),
    faulty("fault-none-middle", None),
    faulty("fault-exit", "exit@observe:1"),
    faulty("fault-hang", "hang@observe:1"),
    faulty("fault-abort", "abort@forward:0"),
    faulty("fault-none-after", None),
]
