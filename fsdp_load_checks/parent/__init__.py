"""The parent process (pytest worker or CLI): launches torchrun, watches the ranks, turns their files into verdicts.

  launch.py     torchrun commands, one launch in its own session, nothing left behind
  stop.py       every process the run started, by pid; SIGTERM/SIGINT/SIGHUP end them all and stop the run
  watchdog.py   the wall clock: progress files, hangs, which rank is behind
  stacks.py     which rank is behind, from the Python stacks each rank dumps when a case overstays
  diagnosis.py  a rank that wrote no result: how it was lost, from exit codes and logs
  runner.py     one run: checkpoints and references (in the reference process), launches, the hang budget, verdicts
"""
