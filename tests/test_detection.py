"""Every check can fail: the historical regressions, re-created as loaders, are each caught by their checks,
and the fixed loader passes every check on every toy case. Real torchrun ranks, real gloo process groups,
one batch: the fixed loader over every toy case and each regression over the fewest toy cases that show its
bug, as loader variants in the same launch (fsdp_load_checks/loaders/regressions.py, planned and tabled by
fsdp_load_checks/detection.py)."""

from __future__ import annotations

import re

import pytest

from fsdp_load_checks import catalogue, detection, render
from fsdp_load_checks.checks import CHECKS
from fsdp_load_checks.loaders import FIXED_LOADER
from fsdp_load_checks.loaders.fixed import NON_LOADING_BRANCH
from fsdp_load_checks.loaders.regressions import REGRESSIONS
from fsdp_load_checks.records import BIG

REGRESSION_NAMES = [r.name for r in REGRESSIONS]
# gathered state dicts, gradients and stepped parameters are the same bytes on every rank and recorded by rank 0
# (rank/after.py): their problems name rank 0 whichever rank went wrong
AFTER_LOADING = ("state-dict", "train-step")
CRASH = r"deepseek-router-bias: rank 1 raised NotImplementedError: Cannot copy out of meta tensor; no data! \(during fsdp2_prepare\)"

# loader -> check -> patterns that must each match a problem line of that check; the checks not listed must pass
EXPECTED: dict[str, dict[str, list[str]]] = {
    "empty-like-era": {
        "no-nan": [
            r"^forgotten-buffer: rank 1 non-persistent buffer model\.layers\.0\.attn\.alibi_slopes has 4 NaN and 0 Inf of 4$",
            r"^forgotten-buffer: rank 1 logits have \d+ NaN",
        ],
        "buffers": [
            r"^forgotten-buffer: rank 1 non-persistent buffer model\.layers\.1\.attn\.alibi_slopes differs from rank 0's: "
            r"4/4 elements differ, max \|diff\| at \[0\]: nan vs 0\.84"
        ],
        "forward": [r"^forgotten-buffer: rank 1 logits differ from the single-process load beyond rtol="],
        # the garbage buffer reaches training too: NaN gradients (measured, not yet re-run with this pattern)
        "train-step": [
            r"^forgotten-buffer: rank 0 gradient of parameter model\.embed_tokens\.weight differs from the "
            r"single-process step: \d+/2048 elements differ, max \|diff\| at \[\d+\]: nan vs "
        ],
    },
    "zeros-like-era": {
        "memory": [
            r"^big-llama: rank 1 committed [\d.]+ MiB \((0\.[5-9]\d|1\.\d\d)x the [\d.]+ MiB model\) during from_pretrained; "
            r"a rank that only receives rank 0's weights may commit at most"
        ],
    },
    "persistent-buffers-on-meta": dict.fromkeys(CHECKS, [CRASH]),
    "rank-local-persistent-buffers": {
        "buffers": [
            r"^deepseek-router-bias: rank 1 persistent buffer model\.layers\.0\.router\.e_score_correction_bias "
            r"differs from rank 0's: 4/4 elements differ, max \|diff\| at \[\d\]: 0 vs 0\.\d+$"
        ],
        "forward": [r"^deepseek-router-bias: rank 1 logits differ from the single-process load beyond rtol="],
        # rank 1's own router bias steers its tokens: its gradients differ; DCP saves one rank's copy of the
        # replicated buffer, so the round trip gives back rank 1's zeros
        "state-dict": [
            r"^deepseek-router-bias: rank 0 full state dict after a sharded save and load \(DCP\): persistent buffer "
            r"model\.layers\.0\.router\.e_score_correction_bias differs from the single-process load: 4/4 elements "
            r"differ, max \|diff\| at \[\d\]: 0 vs 0\.\d+$"
        ],
        "train-step": [r"^deepseek-router-bias: rank \d .* from the single-process step"],
    },
    "non-persistent-not-recomputed": {
        "buffers": [
            r"^llama-rope: rank 1 non-persistent buffer model\.rotary_emb\.inv_freq differs from rank 0's: "
            r"4/4 elements differ, max \|diff\| at \[0\]: 0 vs 1$",
            r"^llama-rope: rank 1 non-persistent buffer model\.rotary_emb\.original_inv_freq differs from rank 0's",
        ],
        "forward": [r"^llama-rope: rank 1 logits differ from the single-process load beyond rtol="],
        # rank 1 trains with the wrong rotary frequencies: the averaged gradients differ
        "train-step": [
            r"^llama-rope: rank 0 gradient of parameter model\.embed_tokens\.weight differs from the single-process "
            r"step: \d+/2048 elements differ"
        ],
    },
    "upcast-on-every-rank": {
        "memory": [
            r"^big-llama-bf16@bf16: rank 1 committed [\d.]+ MiB \([23]\.\d\dx the 140\.0 MiB model\) during fsdp2_prepare; "
            r"a rank that only receives rank 0's weights may commit at most [\d.]+ MiB = shard [\d.]+ \+ largest tensor "
        ],
    },
    "half-precision-master-weights": {
        "parameters": [
            r"^bf16-checkpoint@bf16: rank 0 parameter model\.embed_tokens\.weight has dtype bfloat16, "
            r"the single-process load has float32$",
            r"^bf16-checkpoint@bf16: rank 1 parameter model\.layers\.0\.attn\.qkv\.weight has dtype bfloat16, "
            r"the single-process load has float32$",
        ],
        # the same bf16 master weights seen by training: the optimizer steps bf16, so gradients and steps are bf16
        "train-step": [
            r"^bf16-checkpoint@bf16: rank 0 optimizer steps parameter model\.embed_tokens\.weight in bfloat16, "
            r"the single-process step in float32$",
            r"^bf16-checkpoint@bf16: rank 1 optimizer steps parameter model\.norm\.weight in bfloat16, "
            r"the single-process step in float32$",
            r"^bf16-checkpoint@bf16: rank 0 gradient of parameter model\.layers\.0\.attn\.qkv\.weight has dtype "
            r"bfloat16, the single-process step has float32$",
            r"^bf16-checkpoint@bf16: rank 0 parameter model\.norm\.weight after the step has dtype bfloat16, "
            r"the single-process step has float32$",
        ],
    },
    "non-persistent-buffers-saved": {
        "state-dict": [
            r"^llama-rope: rank 0 full state dict \(accelerator\.get_state_dict\): has persistent buffer "
            r"model\.rotary_emb\.inv_freq, which the single-process load does not have$",
            r"^llama-rope: rank 0 full state dict after a sharded save and load \(DCP\): has persistent buffer "
            r"model\.rotary_emb\.original_inv_freq, which the single-process load does not have$",
            r"^llama-rope: rank 0 save_pretrained file: has persistent buffer model\.rotary_emb\.inv_freq, which "
            r"the single-process save_pretrained does not have$",
        ],
    },
    "tie-lost-on-meta": {
        # the identity check sees the tie gone; training shows what it costs; the save writes the head twice
        "parameters": [r"^tied-embeddings: rank 1 parameters lm_head\.weight, model\.embed_tokens\.weight are no longer tied$"],
        "train-step": [
            r"^tied-embeddings: rank 0 gradient of parameter model\.embed_tokens\.weight differs from the "
            r"single-process step: \d+/2048 elements differ",
            r"^tied-embeddings: rank 0 optimizer does not hold parameter lm_head\.weight \(the single-process step's does\)$",
            r"^tied-embeddings: rank 0 parameter model\.embed_tokens\.weight after the step differs from the "
            r"single-process step",
        ],
        "state-dict": [
            r"^tied-embeddings: rank 0 save_pretrained file: holds parameter lm_head\.weight as a second copy of "
            r"tied model\.embed_tokens\.weight \(the single-process save_pretrained stores the tie once\)$"
        ],
    },
    "non-persistent-cast-to-model-dtype": {
        "buffers": [
            r"^fp32-rope-in-bf16: rank 1 non-persistent buffer model\.rotary_emb\.inv_freq has dtype bfloat16, "
            r"rank 0's has float32$",
            r"^fp32-rope-in-bf16: rank 1 non-persistent buffer model\.rotary_emb\.cos_sin has dtype bfloat16, "
            r"rank 0's has float32$",
        ],
    },
}


def observe_overhead_bound(memory) -> int:
    """What observing may add to a rank's memory: one full tensor gathered at a time (the all-gather's output and
    the contiguous CPU copy the digest reads: 2 x the largest tensor) + the preparation check's 16 MiB slack; never a
    multiple of the model. big-llama, 280 MiB: 127.7-127.8 MiB on both ranks (2 x 64 MiB embeddings)."""
    from fsdp_load_checks.checks import PREPARATION_SLACK_BYTES

    return 2 * memory.largest_tensor_bytes + PREPARATION_SLACK_BYTES


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """loader -> {case: CaseResult}: the whole plan in one batch (one launch, both accelerate configs)."""
    return detection.run_detection(tmp_path_factory.mktemp("detection"))


def problem_lines(loader: str, results: dict) -> dict[str, list[str]]:
    """check -> every problem line of `loader`'s cases. A regression's cases ran as loader variants, named
    `<case>~<loader>` in their lines; the patterns above name the case."""
    return {
        check: [re.sub(rf"^([^:\s]+)~{re.escape(loader)}: ", r"\1: ", line)
                for result in results.values() for line in render.lines(result.verdicts[check])]
        for check in CHECKS
    }


def test_every_regression_has_expectations_and_cases():
    assert sorted(EXPECTED) == sorted(REGRESSION_NAMES)
    known = catalogue.all_cases()
    for r in REGRESSIONS:
        assert r.cases and all(c in known for c in r.cases), r.name
        assert r.summary and "\n" not in r.summary, r.name


def test_fixed_loader_passes_every_check_on_every_toy_case(runs):
    from toy_models.zoo import TOY_CASES

    results = runs[FIXED_LOADER]
    toy = {c.name for c in TOY_CASES}
    assert toy < set(results) and {f"{n}@bf16" for n in toy - set(catalogue.MIXED_PRECISION_SKIP)} < set(results)
    problems = [line for result in results.values() for v in result.verdicts.values() for line in render.lines(v)]
    assert problems == []
    for name, result in results.items():
        if BIG in catalogue.all_cases()[name].tags:  # the memory check really judged the size class, not skipped it
            assert result.verdicts["memory"].skipped == "", name
            assert result.run.observations[1].memory.shard_bytes > 0, name  # and preparation was bounded too
            for rank, obs in result.run.observations.items():  # observing costs a rank one gathered tensor at a time
                assert obs.memory.phases["observe"].committed <= observe_overhead_bound(obs.memory), (name, rank)


@pytest.mark.parametrize("loader", REGRESSION_NAMES)
def test_regression_is_caught_by_its_checks_only(runs, loader):
    results = runs[loader]
    expected = EXPECTED[loader]
    found = problem_lines(loader, results)
    for check in CHECKS:
        lines = found[check]
        if check not in expected:
            assert lines == [], f"{loader}: {check} should pass (not this regression's symptom)"
            continue
        for pattern in expected[check]:
            assert any(re.search(pattern, line) for line in lines), f"{loader}/{check}: no line matches {pattern!r} in {lines}"
        if next(r for r in REGRESSIONS if r.name == loader).every_rank:
            continue
        if check in AFTER_LOADING:
            continue
        # the blame is on ranks 1..N, never on rank 0's values (rank 0 may only have been stopped with its peers)
        blamed0 = [
            p for result in results.values() for p in result.verdicts[check].problems
            if p.rank == 0 and not (p.lost and p.lost.how.blames_a_peer)
        ]
        assert blamed0 == [], blamed0


@pytest.mark.parametrize("loader", [FIXED_LOADER, *REGRESSION_NAMES])
def test_ranks_1_to_n_took_the_cpu_ram_efficient_loading_branch(runs, loader):
    """A verdict only says something about a loader if rank 1 really went through transformers'
    non-loading-rank branch; the loader records which branch each from_pretrained took (loaders.load_branch)."""
    results = runs[loader]
    wrong = []
    for case, result in results.items():
        branch = result.run.observations[1].preparation.get("branch")
        if branch != NON_LOADING_BRANCH:
            wrong.append(f"{case}: {branch or 'no branch recorded'} (rank 1's log: {result.run.launch_dir}/rank1.log)")
    assert wrong == [], (
        f"{loader}: rank 1 did not take the cpu_ram_efficient_loading branch for {len(wrong)} of {len(results)} cases, "
        "so their verdicts test nothing. If the env shows FSDP_CPU_RAM_EFFICIENT_LOADING='False': accelerate's "
        "FullyShardedDataParallelPlugin.__post_init__ exports it from the constructor argument, which "
        "a plugin built with explicit arguments; rank/prepare.fresh_plugin must export the config's env again after "
        "building the plugin.\n" + "\n".join(wrong)
    )


def test_detection_matrix(runs):
    matrix = detection.detection_matrix(runs)
    print("\n\nDetection matrix (loader x check: the cases on which the check fails)\n")
    print(detection.detection_matrix_markdown(matrix))
    assert not any(matrix[FIXED_LOADER].values())
    caught = {loader: {check for check, where in row.items() if where} for loader, row in matrix.items()}
    assert {loader: sorted(checks) for loader, checks in caught.items() if loader != FIXED_LOADER} == {
        loader: sorted(checks) for loader, checks in EXPECTED.items()
    }
    uncaught = [check for check in CHECKS if not any(check in checks for checks in caught.values())]
    assert uncaught == [], f"no regression makes these checks fail: {uncaught}"


def test_the_old_loader_name_is_an_alias_of_the_fixed_loader():
    from fsdp_load_checks import loaders

    assert loaders.canonical("reference") == FIXED_LOADER
    assert loaders.get("reference") is loaders.get(FIXED_LOADER)
