"""Reading the rank behind a hang from faulthandler's stacks: pure functions, on stacks as ranks dump them.

The texts below are trimmed from real rank logs (torch 2.13, gloo): the main thread plus the memory
sampler's, in faulthandler's format, innermost frame first.
"""

from __future__ import annotations

from fsdp_load_checks.parent import stacks
from fsdp_load_checks.parent.watchdog import Watch

SITE = "/venv/lib/python3.11/site-packages"
SAMPLER = f'''Thread 0x00007f21e63546c0 (most recent call first):
  File "/py/lib/python3.11/threading.py", line 331 in wait
  File "/repo/fsdp_load_checks/rank/memory.py", line 61 in _run
  File "/py/lib/python3.11/threading.py", line 1045 in _bootstrap_inner
  File "/py/lib/python3.11/threading.py", line 1002 in _bootstrap
'''
MAIN_TAIL = '''  File "/repo/fsdp_load_checks/rank/case.py", line 73 in run_case
  File "/repo/fsdp_load_checks/rank/__main__.py", line 54 in main
  File "<frozen runpy>", line 88 in _run_code
'''
# rank 0 in our observe phase, gathering a DTensor: the innermost frames are torch/_ops.py, not torch/distributed
GATHER = SAMPLER + f'''
Current thread 0x00007f220ec19b80 (most recent call first):
  File "{SITE}/torch/_ops.py", line 882 in redispatch
  File "{SITE}/torch/_library/autograd.py", line 41 in forward_no_grad
  File "{SITE}/torch/_ops.py", line 1279 in __call__
  File "{SITE}/torch/distributed/_functional_collectives.py", line 142 in wait_tensor
  File "{SITE}/torch/distributed/tensor/_redistribute.py", line 1766 in redistribute_local_tensor
  File "{SITE}/torch/autograd/function.py", line 625 in apply
  File "{SITE}/torch/distributed/tensor/_api.py", line 774 in full_tensor
  File "/repo/fsdp_load_checks/observe.py", line 60 in record
''' + MAIN_TAIL
# rank 0 inside accelerate's fsdp2_load_full_state_dict, in gloo's broadcast
BROADCAST = SAMPLER + f'''
Current thread 0x00007f220ec19b80 (most recent call first):
  File "{SITE}/torch/distributed/distributed_c10d.py", line 2830 in broadcast
  File "{SITE}/torch/distributed/c10d_logger.py", line 81 in wrapper
  File "{SITE}/accelerate/utils/fsdp_utils.py", line 640 in fsdp2_load_full_state_dict
  File "{SITE}/accelerate/utils/fsdp_utils.py", line 893 in fsdp2_prepare_model
''' + MAIN_TAIL
# rank 1 asleep in accelerate's preparation (tests' fault), outside any collective
ASLEEP = SAMPLER + '''
Current thread 0x00007fdbfe42fb80 (most recent call first):
  File "/repo/fsdp_load_checks/rank/faults.py", line 60 in stalled
  File "/venv/lib/python3.11/site-packages/accelerate/utils/fsdp_utils.py", line 893 in fsdp2_prepare_model
''' + MAIN_TAIL
# a rank computing inside torch, not communicating
COMPUTING = f'''Current thread 0x00007fdbfe42fb80 (most recent call first):
  File "{SITE}/torch/nn/modules/linear.py", line 134 in forward
  File "{SITE}/torch/nn/modules/module.py", line 1786 in _call_impl
''' + MAIN_TAIL


def test_the_main_thread_is_found_among_the_threads():
    threads = stacks.threads(GATHER)
    assert len(threads) == 2
    main = stacks.main_stack(GATHER)
    assert main[0].func == "redispatch" and main[-1].func == "_run_code"
    assert stacks.main_stack("rank 1 log without any dump\n") is None


def test_the_last_dump_of_a_log_counts():
    main = stacks.main_stack(ASLEEP + "\nsome later output\n" + BROADCAST)
    assert main[0].func == "broadcast"


def test_a_collective_is_read_from_the_whole_innermost_run_of_torch_frames():
    assert stacks.waiting_in(stacks.main_stack(GATHER)) == "full_tensor"  # innermost frame is torch/_ops.py
    assert stacks.waiting_in(stacks.main_stack(BROADCAST)) == "broadcast"
    assert stacks.waiting_in(stacks.main_stack(ASLEEP)) == ""
    assert stacks.waiting_in(stacks.main_stack(COMPUTING)) == ""  # in torch, but no collective


def test_a_tie_in_progress_is_broken_by_the_stacks():
    tied = Watch(hung={0, 1})
    judged = stacks.judge(tied, {0: stacks.main_stack(BROADCAST), 1: stacks.main_stack(ASLEEP)})
    assert (judged.hung, judged.waiting, judged.overdue, judged.collective) == ({1}, {0}, set(), {0: "broadcast"})


def test_ranks_the_stacks_cannot_place_are_overdue_not_hung():
    both_waiting = stacks.judge(Watch(hung={0, 1}), {0: stacks.main_stack(BROADCAST), 1: stacks.main_stack(GATHER)})
    assert (both_waiting.hung, both_waiting.overdue) == (set(), {0, 1})
    assert both_waiting.why == "every one of them waits in a collective (broadcast, full_tensor)"
    silent = stacks.judge(Watch(hung={0, 1}), {0: stacks.main_stack(BROADCAST), 1: None})
    assert (silent.hung, silent.overdue, silent.why) == (set(), {0, 1}, "rank 1 left no Python stacks")


def test_progress_that_already_tells_is_kept_and_named():
    ahead = stacks.judge(Watch(hung={1}, waiting={0}), {0: stacks.main_stack(GATHER), 1: stacks.main_stack(ASLEEP)})
    assert (ahead.hung, ahead.waiting, ahead.collective) == ({1}, {0}, {0: "full_tensor"})
    # two ranks stuck on their own (neither in a collective): both really hang
    apart = stacks.judge(Watch(hung={0, 1}), {0: stacks.main_stack(COMPUTING), 1: stacks.main_stack(ASLEEP)})
    assert (apart.hung, apart.overdue) == ({0, 1}, set())


def test_the_judgement_becomes_each_ranks_story(tmp_path):
    from fsdp_load_checks import render
    from fsdp_load_checks.parent.diagnosis import lost_ranks
    from fsdp_load_checks.records import LaunchConfig, LostHow

    cfg = LaunchConfig(case_timeout_s=8)
    tie = stacks.judge(Watch(hung={0, 1}), {0: stacks.main_stack(BROADCAST), 1: stacks.main_stack(ASLEEP)})
    hung, blocked = lost_ranks("c", [0, 1], tmp_path, cfg, tie, 3)
    assert render.lost_line(hung) == ("rank 1 hung for more than 8s (killed; Python stacks in its log) during startup "
                                      "of c (rank 0 waiting for it in broadcast)")
    assert render.lost_line(blocked) == (
        "rank 0 was blocked waiting for rank 1 in broadcast (killed) during startup of c"
    )
    undecided = stacks.judge(Watch(hung={0, 1}), {0: stacks.main_stack(BROADCAST), 1: stacks.main_stack(GATHER)})
    lost = lost_ranks("c", [0, 1], tmp_path, cfg, undecided, 3)
    assert [x.how for x in lost] == [LostHow.OVERDUE, LostHow.OVERDUE]
    assert render.lost_line(lost[1]) == (
        "rank 1 overstayed 8s (killed; Python stacks in its log) during startup of c; the stacks cannot tell which "
        "rank is behind: every one of them waits in a collective (broadcast, full_tensor)"
    )
