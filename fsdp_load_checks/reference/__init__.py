"""The reference process: checkpoints and the plain single-process load every rank is compared with.

Run in a fresh interpreter per batch (`python -m fsdp_load_checks.reference
ROOT CASE...`) so no distributed state, env flag or loader patch of the
parent or the ranks can leak into what "correct" means.

  __main__.py  entry point: build each case's checkpoint, then observe its plain load
  plain.py     the plain load: `from_pretrained` with no FSDP and no env flags, then observe and forward
"""
