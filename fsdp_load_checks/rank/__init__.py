"""The rank side: one process per rank, started by torchrun (`python -m fsdp_load_checks.rank SPEC`).

  __main__.py  entry point: process group, the batch of cases, one result file per case
  case.py      one case on one rank: loader -> from_pretrained -> FSDP2 prepare -> observe -> forward
  progress.py  where this rank is, for the parent's watchdog
  prepare.py   FSDP2 preparation through accelerate's own code
  memory.py    RssAnon sampler per phase
  faults.py    faults a harness self-test injects into one rank

Ranks only observe; they never decide pass/fail.
"""
