"""The parent process (pytest worker or CLI): launches torchrun, watches the ranks, turns their files into verdicts.

  launch.py     torchrun commands, one launch in its own session, nothing left behind
  watchdog.py   the wall clock: progress files, hangs, which rank is behind
  diagnosis.py  a rank that wrote no result: how it was lost, from exit codes and logs
  runner.py     one run: checkpoints and references (in the reference process), launches, verdicts
"""
