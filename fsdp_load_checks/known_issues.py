"""Upstream bugs that are real today, matched by their exact symptom and version range.

An entry turns a failing (case, check) into an expected failure only when
every problem line matches its symptom, so a second bug in the same case
still fails. It is strict: when an affected case passes, the entry is
stale (upstream fixed it) and the suite fails to say so.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet

from fsdp_load_checks.cases import BIG, PERSISTENT_BUFFER, Case
from fsdp_load_checks.checks import CHECKS, Verdict

ALL_CHECKS = frozenset(CHECKS)


@dataclass(frozen=True)
class KnownIssue:
    key: str
    url: str
    title: str
    package: str
    affected: str  # PEP 440 specifier of the releases that have the bug
    selects: Callable[[Case], bool]
    symptoms: dict[str, str]  # check -> regex every problem line of that check must match
    loaders: tuple[str, ...] = ("stock",)  # the installed stack's bugs; a patched loader must not inherit them

    def applies(self, case: Case, check: str, versions: dict[str, str], loader: str = "stock") -> bool:
        if loader not in self.loaders:
            return False
        installed = versions.get(self.package)
        if not installed or installed == "absent" or check not in self.symptoms:
            return False
        return SpecifierSet(self.affected).contains(installed, prereleases=True) and self.selects(case)


def _tagged(tag: str) -> Callable[[Case], bool]:
    return lambda case: tag in case.tags


def _named(*names: str) -> Callable[[Case], bool]:
    return lambda case: case.name in names


PERSISTENT_BUFFER_CRASH = r"rank \d+ raised AttributeError: 'Tensor' object has no attribute 'device_mesh' \(during fsdp2_prepare\)"
FORGOTTEN = r"non-persistent buffer model\.layers\.\d+\.attn\.alibi_slopes"
MODELING_UTILS = "https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/modeling_utils.py"
RECURRENT_GEMMA_ROPE = r"non-persistent buffer model\.layers\.\d+\.temporal_block\.rotary_emb\.(original_)?inv_freq"
# A rank that only receives rank 0's weights committing about the whole model (0.9x-1.5x) while loading:
# the non-rank-0 branch wrote into every parameter and buffer. Multiples above 1.5x are another bug.
WHOLE_MODEL_ON_A_RECEIVING_RANK = (
    r"^\S+: rank \d+ committed [\d.]+ MiB \((0\.9\d|1\.[0-4]\d)x the [\d.]+ MiB model\) during from_pretrained; "
    r"a rank that only receives rank 0's weights may commit at most "
)

# Version ranges are exact: entries are strict, so a release inside a range where the bug is absent fails
# as stale, and a release outside it fails on the symptom. Eras of the non-rank-0 branch of
# PreTrainedModel._move_missing_keys_from_meta_to_device (read from each release's modeling_utils.py;
# docs/version-matrix.md has the matrix and the tox envs that check it):
#   5.0.0 - 5.3.0   torch.empty_like for every param and buffer, nothing marked initialised: rank 1
#                   re-initialises the whole model (initialize_weights) -> commits it (reinit-era-memory)
#   5.4.0 - 5.5.4   torch.empty_like, state-dict entries marked initialised: nothing committed; a buffer
#                   _init_weights does not recompute is garbage on ranks 1..N (uninitialised-non-persistent-buffer)
#   5.6.0 - 5.22.2  torch.zeros_like for every param and buffer (PR 45050): every rank 1..N commits the
#                   whole model (zeros-like-era-memory); a forgotten buffer is zeros on ranks 1..N
#   5.23.0 -        zeros_like placeholders for non-persistent buffers only

KNOWN_ISSUES = [
    KnownIssue(
        key="accelerate-3898",
        url="https://github.com/huggingface/accelerate/issues/3898",
        title="fsdp2_load_full_state_dict reads .device_mesh of every state-dict entry; persistent buffers are plain tensors",
        package="accelerate",
        affected=">=1.10.0",  # no fixed release yet (fix PRs 3921 and 4023 closed unmerged)
        selects=_tagged(PERSISTENT_BUFFER),
        symptoms=dict.fromkeys(ALL_CHECKS, rf"^\S+: {PERSISTENT_BUFFER_CRASH}$"),
    ),
    KnownIssue(
        key="uninitialised-non-persistent-buffer",
        url=MODELING_UTILS + "#L4842",
        title=(
            "transformers 5 builds models on meta and restores non-persistent buffers only through _init_weights: "
            "one it does not recompute is left uninitialised (torch.empty_like) on the loading rank and in any plain "
            "load, and as a zeros placeholder on ranks 1..N, which fsdp2_prepare_model keeps (it re-registers each "
            "rank's own copy, never rank 0's)"
        ),
        package="transformers",
        affected=">=5.0.0",
        selects=_named("forgotten-buffer"),
        symptoms={
            "no-nan": rf"^\S+: rank \d+ ({FORGOTTEN} has \d+ NaN|logits have \d+ NaN)",
            "buffers": rf"^\S+: .*{FORGOTTEN}",
            "forward": r"^\S+: rank \d+ logits differ from the single-process load",
        },
    ),
    KnownIssue(
        key="shared-non-persistent-buffer-left-on-meta",
        url=MODELING_UTILS + "#L4880",
        title=(
            "_move_missing_keys_from_meta_to_device walks named_non_persistent_buffers() with duplicates removed, so "
            "a buffer registered under two modules is materialised under its first name only and stays on meta "
            "under the other; fsdp2_prepare_model then fails copying it (found by this suite, not yet reported)"
        ),
        package="transformers",
        affected=">=5.0.0",
        selects=_named("shared-buffer"),
        symptoms=dict.fromkeys(
            ALL_CHECKS,
            r"^\S+: rank \d+ raised NotImplementedError: Cannot copy out of meta tensor; no data! \(during fsdp2_prepare\)$",
        ),
    ),
    KnownIssue(
        key="recurrent-gemma-rope-not-in-init-weights",
        url=(
            "https://github.com/huggingface/transformers/blob/v5.3.0/src/transformers/models/recurrent_gemma/"
            "modeling_recurrent_gemma.py#L566"
        ),
        title=(
            "transformers 5.0.0-5.3.0: RecurrentGemmaPreTrainedModel._init_weights does not recompute "
            "RecurrentGemmaRotaryEmbedding's inv_freq/original_inv_freq, so the attention layer's RoPE buffers are "
            "left uninitialised (torch.empty_like) on every rank and in a plain load; 5.4.0 added the branch"
        ),
        package="transformers",
        affected=">=5.0.0,<5.4.0",
        selects=_named("arch-recurrent-gemma"),
        symptoms={
            "no-nan": rf"^\S+: rank \d+ ({RECURRENT_GEMMA_ROPE} has \d+ NaN|logits have \d+ NaN)",
            "buffers": rf"^\S+: rank \d+ {RECURRENT_GEMMA_ROPE} differs from ",
            "forward": r"^\S+: rank \d+ logits differ from the single-process load",
        },
    ),
    KnownIssue(
        key="zeros-like-era-memory",
        url="https://github.com/huggingface/transformers/pull/45649",
        title=(
            "transformers 5.6.0-5.22.2 (PR 45050, 'fix NaN weights'): ranks 1..N give every parameter and buffer a "
            "torch.zeros_like placeholder in _move_missing_keys_from_meta_to_device; zero-filling commits every page, "
            "so each rank that only receives commits the whole model during from_pretrained (Qwen3-30B-A3B, 8 ranks "
            "a node: host peak ~60 GB -> ~480 GB, OOM; bisected in PR 45649, fixed in 5.23.0)"
        ),
        package="transformers",
        affected=">=5.6.0,<5.23.0",
        selects=_tagged(BIG),
        symptoms={"memory": WHOLE_MODEL_ON_A_RECEIVING_RANK},
    ),
    KnownIssue(
        key="reinit-era-memory",
        url="https://github.com/huggingface/transformers/blob/v5.3.0/src/transformers/modeling_utils.py#L4542",
        title=(
            "transformers 5.0.0-5.3.0: ranks 1..N give every parameter and buffer a torch.empty_like placeholder and "
            "mark nothing initialised, so initialize_weights() re-initialises the whole model there: each rank that "
            "only receives commits the whole model during from_pretrained (and loads ~6x slower than rank 0), for "
            "values the broadcast then replaces; 5.4.0 marks the state-dict entries initialised"
        ),
        package="transformers",
        affected=">=5.0.0,<5.4.0",
        selects=_tagged(BIG),
        symptoms={"memory": WHOLE_MODEL_ON_A_RECEIVING_RANK},
    ),
]


@dataclass
class Outcome:
    status: str  # "passed" | "failed" | "xfailed" | "skipped"
    message: str


def classify(case: Case, verdict: Verdict, versions: dict[str, str], registry=None, loader: str = "stock") -> Outcome:
    if verdict.skipped:
        return Outcome("skipped", verdict.skipped)
    registry = KNOWN_ISSUES if registry is None else registry
    issues = [k for k in registry if k.applies(case, verdict.check, versions, loader)]
    if not issues:
        if verdict.passed:
            return Outcome("passed", "")
        return Outcome("failed", "\n".join(verdict.problems))
    if verdict.passed:
        keys = ", ".join(f"{k.key} ({k.url})" for k in issues)
        return Outcome(
            "failed",
            f"{case.name}/{verdict.check} passed but is registered as known issue {keys} for "
            f"{', '.join(f'{k.package} {versions.get(k.package)}' for k in issues)}: upstream fixed it, "
            "narrow the entry's version range in known_issues.py (strict xfail)",
        )
    unexplained = [
        p for p in verdict.problems if not any(re.search(k.symptoms[verdict.check], p) for k in issues)
    ]
    if unexplained:
        return Outcome(
            "failed",
            "\n".join(unexplained)
            + f"\n(known issue {', '.join(k.key for k in issues)} applies, but the lines above are not its symptom)",
        )
    k = next(k for k in issues if any(re.search(k.symptoms[verdict.check], p) for p in verdict.problems))
    return Outcome("xfailed", f"known issue {k.key} ({k.url}): {verdict.problems[0]}")
