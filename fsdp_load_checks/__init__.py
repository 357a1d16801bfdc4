"""fsdp-load-checks: correctness checks for loading a pretrained model under FSDP2 with cpu_ram_efficient_loading.

The tree follows the process boundary (README "Layout"):

  records/     the bottom layer: plain data crossing process boundaries; imports nothing of ours
  parent/      runs in the parent (pytest worker or CLI): launches, watchdog, diagnosis, runner
  rank/        runs in each torchrun rank: load, prepare, observe
  reference/   runs in the reference process: checkpoints and the plain single-process load
  loaders/     what ranks load with: stock, the fixed patch set, re-created regressions

and, shared: catalogue (cases), checkpoints, observe and tensors (inside a
process that holds a model), checks (pure verdicts), known_issues, render
(text), report, options (the option table), plugin and cli (front ends).
"""
