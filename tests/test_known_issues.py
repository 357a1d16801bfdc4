"""Known issues match problems by their fields, never by rendered text; strict both ways."""

from __future__ import annotations

from functools import partial

from fsdp_load_checks import known_issues, render
from fsdp_load_checks.records import (
    Case,
    CaseResult,
    CaseRun,
    Failure,
    KnownIssue,
    MemoryExcess,
    Observation,
    Phase,
    Problem,
    ProblemKind,
    Quantity,
    Status,
    Symptom,
    TensorKind,
    Verdict,
)
from fsdp_load_checks.records.case import (
    BIG,
    CONVERTED_ON_LOAD,
    FORGOTTEN_BUFFER,
    MISSING_PARAMETERS,
    MIXED_PRECISION,
    PERSISTENT_BUFFER,
    TIED,
    TIED_BEYOND_EMBEDDINGS,
)

NEWEST = {"transformers": "5.24.0", "accelerate": "1.15.0"}
MiB = 1 << 20


def case(*tags: str, tensors=None) -> Case:
    return Case("c", "test", dict).with_tags(*tags, tensors=tensors)


def crash(message="'Tensor' object has no attribute 'device_mesh'", exc="AttributeError", phase=Phase.FSDP2_PREPARE):
    return Problem("buffers", "c", ProblemKind.RAISED, rank=1, failure=Failure(1, phase, exc, message, "tb"))


def classify(c: Case, *problems: Problem, check="buffers", versions=NEWEST):
    return known_issues.classify(c, Verdict("c", check, list(problems)), versions)


def test_the_exact_exception_is_expected():
    outcome = classify(case(PERSISTENT_BUFFER), crash())
    assert outcome.status == Status.XFAILED and outcome.issues[0].key == "accelerate-3898"
    assert render.outcome_message(outcome).startswith("known issue accelerate-3898 (")


def test_another_exception_message_or_phase_in_the_same_case_still_fails():
    for other in (crash(message="something else"), crash(exc="KeyError"), crash(phase=Phase.OBSERVE)):
        outcome = classify(case(PERSISTENT_BUFFER), crash(), other)
        assert outcome.status == Status.FAILED and outcome.problems == [other]
        assert "applies, but the lines above are not its symptom" in render.outcome_message(outcome)


def test_a_registered_bug_that_does_not_show_fails_as_stale():
    outcome = classify(case(PERSISTENT_BUFFER))
    assert outcome.status == Status.FAILED and outcome.stale
    assert "passed but is registered as known issue accelerate-3898" in render.outcome_message(outcome)


def test_outside_its_version_range_an_issue_does_not_apply():
    memory = Problem("memory", "c", ProblemKind.MEMORY, rank=1,
                     memory=MemoryExcess(Phase.FROM_PRETRAINED, 280 * MiB, 280 * MiB, 0.1, False, "RssAnon"))
    assert classify(case(BIG), memory, check="memory", versions={"transformers": "5.6.0"}).status == Status.XFAILED
    assert classify(case(BIG), memory, check="memory").status == Status.FAILED  # 5.24.0: fixed, so a new bug


def test_a_numeric_range_bounds_the_memory_symptom():
    def excess(multiple: float, loading: bool = False) -> Problem:
        committed = int(multiple * 100 * MiB)
        return Problem("memory", "c", ProblemKind.MEMORY, rank=1,
                       memory=MemoryExcess(Phase.FROM_PRETRAINED, committed, 100 * MiB, 0.1, loading, "RssAnon"))

    era = {"transformers": "5.10.0"}
    assert classify(case(BIG), excess(1.0), check="memory", versions=era).status == Status.XFAILED
    assert classify(case(BIG), excess(0.5), check="memory", versions=era).status == Status.FAILED
    assert classify(case(BIG), excess(2.0), check="memory", versions=era).status == Status.FAILED  # held twice: another bug
    assert classify(case(BIG), excess(1.0, loading=True), check="memory", versions=era).status == Status.FAILED


def test_converted_weights_on_a_receiving_rank_are_expected_alone_now_and_on_top_of_an_era_placeholders():
    def excess(multiple: float, loading: bool = False) -> Problem:
        return Problem("memory", "c", ProblemKind.MEMORY, rank=1,
                       memory=MemoryExcess(Phase.FROM_PRETRAINED, int(multiple * 100 * MiB), 100 * MiB, 0.1, loading,
                                           "RssAnon"))

    moe = case(BIG, CONVERTED_ON_LOAD)
    outcome = classify(moe, excess(0.94), check="memory")  # 5.24: the stacked experts alone
    assert outcome.status == Status.XFAILED and outcome.issues[0].key == "converted-weights-on-receiving-ranks"
    assert classify(moe, excess(1.81), check="memory").status == Status.FAILED  # twice the experts: another bug
    assert classify(moe, excess(0.94, loading=True), check="memory").status == Status.FAILED
    assert classify(case(BIG), excess(0.94), check="memory").status == Status.FAILED  # a dense model converts nothing
    zeros_era = {"transformers": "5.6.0"}  # zeros_like placeholders (1x) + the stacked experts
    assert classify(moe, excess(1.81), check="memory", versions=zeros_era).status == Status.XFAILED
    assert classify(case(BIG), excess(1.81), check="memory", versions=zeros_era).status == Status.FAILED


def test_a_tag_symptom_matches_exactly_the_tensors_the_case_names():
    forgotten = case(tensors={FORGOTTEN_BUFFER: ("model.a.slopes",)})
    problem = partial(Problem, "buffers", "c", ProblemKind.VALUES, rank=1, tensor_kind=TensorKind.NON_PERSISTENT)
    assert classify(forgotten, problem(tensor="model.a.slopes")).status == Status.XFAILED
    outcome = classify(forgotten, problem(tensor="model.a.slopes"), problem(tensor="model.b.inv_freq"))
    assert outcome.status == Status.FAILED and [p.tensor for p in outcome.problems] == ["model.b.inv_freq"]


def test_a_patched_loader_inherits_no_stock_issue():
    c = case(PERSISTENT_BUFFER)
    verdict = Verdict("c", "buffers", [crash()])
    assert known_issues.classify(c, verdict, NEWEST, loader="fixed").status == Status.FAILED


def test_a_loader_variant_shares_its_cases_checkpoint_and_plain_load_and_is_judged_under_its_own_loader():
    base = Case("c", "test", dict).under("fsdp2-bf16", "bf16")
    variant = base.with_loader("fixed", poison=True)
    assert (variant.name, variant.loader, variant.poison, variant.accelerate_config) == ("c@bf16~fixed", "fixed", True,
                                                                                        "fsdp2-bf16")
    assert (variant.checkpoint_name, variant.reference_name) == ("c", "c@bf16")
    reference = Observation(case="c", rank=-1, world_size=1)
    reference.versions = dict(NEWEST)
    result = CaseResult("c~fixed", CaseRun("c~fixed", 2), reference, {"buffers": Verdict("c", "buffers", [crash()])})
    stock = case(PERSISTENT_BUFFER)
    assert known_issues.outcomes(result, stock, "stock")["buffers"].status == Status.XFAILED
    # the run's loader is stock, the variant's own is not: a patched loader inherits no stock issue
    assert known_issues.outcomes(result, stock.with_loader("fixed"), "stock")["buffers"].status == Status.FAILED


def test_min_rank_and_when_tagged_limit_a_symptom():
    issue = KnownIssue("k", "u", "t", "transformers", ">=5", lambda c: True, {
        "forward": (Symptom(kinds=frozenset({ProblemKind.LOGITS}), min_rank=1, when_tagged="x"),),
    })
    logits = partial(Problem, "forward", "c", ProblemKind.LOGITS)
    tagged, untagged = case("x"), case()
    assert known_issues.classify(tagged, Verdict("c", "forward", [logits(rank=1)]), NEWEST, [issue]).status == Status.XFAILED
    assert known_issues.classify(tagged, Verdict("c", "forward", [logits(rank=0)]), NEWEST, [issue]).status == Status.FAILED
    # the symptom does not apply to an untagged case: no issue, a plain failure (and a pass is no stale entry)
    assert known_issues.classify(untagged, Verdict("c", "forward", []), NEWEST, [issue]).status == Status.PASSED


def test_a_second_package_range_must_hold_too():
    issue = KnownIssue("k", "u", "t", "accelerate", ">=1.14.0,<1.15.0", lambda c: True,
                       {"forward": (Symptom(kinds=frozenset({ProblemKind.LOGITS})),)}, also={"torch": ">=2.13"})
    logits = Verdict("c", "forward", [Problem("forward", "c", ProblemKind.LOGITS, rank=0)])
    stack = {"accelerate": "1.14.0", "torch": "2.13.0+cpu"}
    assert known_issues.classify(case(), logits, stack, [issue]).status == Status.XFAILED
    assert known_issues.classify(case(), logits, {**stack, "torch": "2.12.0"}, [issue]).status == Status.FAILED
    assert known_issues.classify(case(), logits, {"accelerate": "1.14.0"}, [issue]).status == Status.FAILED


def test_a_dtype_symptom_matches_the_exact_dtypes():
    from fsdp_load_checks.records import Against
    from fsdp_load_checks.records.case import MIXED_PRECISION

    bf16 = Case("c", "test", dict, dtype="bfloat16").with_tags(MIXED_PRECISION)
    acc1130 = {"transformers": "5.24.0", "accelerate": "1.13.0"}

    def dtype(got, want="float32", against=Against.PLAIN_LOAD):
        return Problem("parameters", "c", ProblemKind.DTYPE, rank=1, tensor="lm_head.weight", against=against,
                       got=got, want=want)

    def status(*problems):
        return known_issues.classify(bf16, Verdict("c", "parameters", list(problems)), acc1130).status

    assert status(dtype("bfloat16")) == Status.XFAILED  # accelerate-3979
    assert status(dtype("bfloat16"), dtype("float16", want="bfloat16", against=Against.RANK0)) == Status.FAILED
    assert status(dtype("float64")) == Status.FAILED
    assert known_issues.classify(bf16, Verdict("c", "parameters", [dtype("bfloat16")]), NEWEST).status == Status.FAILED


def test_a_bf16_checkpoint_saved_in_fp32_is_expected_only_under_mixed_precision_and_only_as_fp32():
    dtype = partial(Problem, "state-dict", "c", ProblemKind.DTYPE, rank=0, tensor="w", tensor_kind=TensorKind.PARAMETER)
    bf16 = Case("c", "test", dict, dtype="bfloat16")
    fp32_saved = dtype(quantity=Quantity.SAVED, got="float32", want="bfloat16")
    outcome = classify(bf16.with_tags(MIXED_PRECISION), fp32_saved, check="state-dict")
    assert outcome.status == Status.XFAILED and outcome.issues[0].key == "mixed-precision-state-dict-in-fp32"
    assert classify(bf16, fp32_saved, check="state-dict").status == Status.FAILED  # no mixed precision: a new bug
    other = dtype(quantity=Quantity.SAVED, got="float16", want="bfloat16")
    assert classify(bf16.with_tags(MIXED_PRECISION), other, check="state-dict").status == Status.FAILED
    reloaded = dtype(quantity=Quantity.RELOADED, got="float32", want="bfloat16")  # the plain reload casts: not this bug
    assert classify(bf16.with_tags(MIXED_PRECISION), reloaded, check="state-dict").status == Status.FAILED


def test_a_tie_saved_twice_is_expected_only_for_the_names_the_plain_load_ties():
    copy = partial(Problem, "state-dict", "c", ProblemKind.TIED_COPY, rank=0, quantity=Quantity.SAVED,
                   tensor_kind=TensorKind.PARAMETER, got="model.embed.weight")
    tied = case(tensors={TIED: ("model.embed.weight", "lm_head.weight")})
    assert classify(tied, copy(tensor="lm_head.weight"), check="state-dict").status == Status.XFAILED
    assert classify(tied, copy(tensor="model.other.weight"), check="state-dict").status == Status.FAILED
    assert classify(case(), copy(tensor="lm_head.weight"), check="state-dict").status == Status.FAILED
    assert classify(tied, check="state-dict").status == Status.FAILED  # stale: the tie was saved once


def test_missing_parameters_colliding_in_the_optimizer_map_is_expected_only_for_two_or_more_on_ranks_1_to_n():
    lost = partial(Problem, "train-step", "c", ProblemKind.MISSING, quantity=Quantity.MASTER,
                   tensor_kind=TensorKind.PARAMETER)
    two = case(tensors={MISSING_PARAMETERS: ("model.embed_tokens.weight", "lm_head.weight")})
    assert classify(two, lost(rank=1, tensor="model.embed_tokens.weight"), check="train-step").status == Status.XFAILED
    assert classify(two, lost(rank=0, tensor="model.embed_tokens.weight"), check="train-step").status == Status.FAILED
    assert classify(two, lost(rank=1, tensor="model.norm.weight"), check="train-step").status == Status.FAILED
    one = case(tensors={MISSING_PARAMETERS: ("lm_head.weight",)})  # nothing to collide with
    assert classify(one, lost(rank=1, tensor="lm_head.weight"), check="train-step").status == Status.FAILED
    assert classify(two, check="train-step").status == Status.FAILED  # stale: every rank's optimizer held them


def test_a_tie_beyond_the_embeddings_raising_at_the_first_forward_is_expected_on_accelerate_1_15_only():
    from fsdp_load_checks.known_issues import TIED_IN_TWO_GROUPS_MESSAGE

    def raised(name: str, check: str, phase=Phase.FORWARD) -> Problem:
        return Problem(check, "c", ProblemKind.RAISED, rank=0,
                       failure=Failure(0, phase, "ValueError", TIED_IN_TWO_GROUPS_MESSAGE.format(name), "tb"))

    stack = {**NEWEST, "torch": "2.13.0"}
    t5 = case(tensors={TIED_BEYOND_EMBEDDINGS: ("shared.weight",)})
    for check in ("forward", "state-dict", "train-step"):  # the forward raises; nothing after it runs
        outcome = classify(t5, raised("shared.weight", check), check=check, versions=stack)
        assert outcome.status == Status.XFAILED, check
        assert outcome.issues[0].key == "accelerate-ties-beyond-embeddings-two-fsdp-groups"
    assert classify(t5, raised("model.layers.0.weight", "forward"), check="forward", versions=stack).status == Status.FAILED
    assert classify(t5, raised("shared.weight", "forward", Phase.OBSERVE), check="forward",
                    versions=stack).status == Status.FAILED
    assert classify(case(), raised("shared.weight", "forward"), check="forward", versions=stack).status == Status.FAILED
    on_1_14 = {**stack, "accelerate": "1.14.0"}  # the tail group without the output embedding: another entry's
    assert "accelerate-ties-beyond-embeddings-two-fsdp-groups" not in {
        k.key for k in classify(t5, raised("shared.weight", "forward"), check="forward", versions=on_1_14).issues}
    assert classify(t5, check="forward", versions=stack).status == Status.FAILED  # stale: the forward ran
