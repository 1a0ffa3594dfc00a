"""Counting speculation one way everywhere: a sequence's step from its plan, proposal and verdict, and the counts
kept per request, per step and (merged) fleet-wide."""

from __future__ import annotations

from specfleet.speculation import Proposal, Verdict
from specfleet.stats import AcceptanceCounts, RequestStats, SequenceStep, StepStats


def test_a_chain_that_stops_short_of_the_depth_asked_for_is_one_rejected_first_try() -> None:
    verdict = Verdict((5, 6, 7), accepted=2)
    assert SequenceStep.of(4, Proposal((5, 6, 9, 9)), verdict, 3) == SequenceStep(4, 4, 2, 1, emitted=3)
    # Cut short by a drafter with nothing more to offer counts the same: the position asked for had no draft.
    assert SequenceStep.of(4, Proposal((5, 6)), verdict, 3) == SequenceStep(4, 2, 2, 1, emitted=3)
    assert SequenceStep.of(2, Proposal((5, 6)), verdict, 3) == SequenceStep(2, 2, 2, 0, emitted=3)


def test_a_tree_counts_its_rejected_first_tries_and_its_later_siblings_apart() -> None:
    # Root children 0 and 1; node 0's children 2 and 3. Path: node 1 (a later sibling), then nothing under it.
    proposal = Proposal((10, 11, 12, 13), parents=(-1, -1, 0, 0))
    step = SequenceStep.of(4, proposal, Verdict((11, 20), accepted=1, accepted_nodes=(1,)), 2)
    assert (step.drafted, step.accepted, step.first_rejected) == (4, 1, 1)
    assert (step.later_siblings_accepted, step.later_siblings_tried) == (1, 1)


def test_a_drafter_that_offers_nothing_when_asked_counts_as_a_miss_not_a_rejection() -> None:
    stats = StepStats("t", batch_size=3, planned=[4, 4, 0], deepest=4)
    stats.observe(SequenceStep.of(4, Proposal((1, 2, 3, 4)), Verdict((1, 2, 3, 4, 5), 4), 5))
    stats.observe(SequenceStep.of(4, None, Verdict((7,), 0), 1))  # asked for 4, the drafter had none
    stats.observe(SequenceStep.of(0, None, Verdict((8,), 0), 1))  # not asked: no evidence either way
    a = stats.acceptance
    assert (a.sequence_steps, a.accepted, a.rejections, a.misses, a.offers) == (2, 4, 0, 1, 1)
    assert stats.accepted == [4]  # accepted tokens per drafting step: only steps that drafted
    assert stats.emitted == 7


def test_a_self_drafting_targets_first_step_is_neither_an_offer_nor_a_miss() -> None:
    """The target had no candidates yet and drafted for the next step: nothing came up empty, so the policy's offer
    rate must not fall (it would then plan plain steps, and each return to drafting would start empty again)."""
    step = SequenceStep.of(3, Proposal((), draft_next=3, first=True), Verdict((7,), 0), 1)
    assert not step.asked and not step.missed and step.emitted == 1
    assert SequenceStep.of(3, Proposal((4, 5, 6), draft_next=3), Verdict((4, 9), 1), 2).drafted == 3
    # Candidates asked for last step and none proposed (prompt lookup without a match): that is a miss.
    assert SequenceStep.of(3, Proposal((), draft_next=3), Verdict((7,), 0), 1).missed


def test_per_step_counts_merge_into_the_same_totals_as_counting_once() -> None:
    steps = [SequenceStep(4, 4, 2, 1), SequenceStep(4), SequenceStep(6, 6, 6), SequenceStep(5, 5, 2, 1, 1, 3)]
    once, merged = AcceptanceCounts(), AcceptanceCounts()
    for step in steps:
        once.observe(step)
    for pair in (steps[:2], steps[2:]):
        part = AcceptanceCounts()
        for step in pair:
            part.observe(step)
        merged.merge(part)
    assert merged == once
    assert once.proposed_by_position == [3, 3, 3, 3, 2, 1] and once.accepted_by_position == [3, 3, 1, 1, 1, 1]
    assert (once.first_accepted, once.later_siblings_rejected, once.drafted) == (9, 2, 15)


def test_a_requests_summary_reports_its_latest_step() -> None:
    stats = RequestStats()
    stats.observe(SequenceStep(4, 4, 3, 1, emitted=4), "depth 4")
    stats.observe(SequenceStep(0, emitted=1), "depth 0")
    summary = stats.summary()
    assert (summary.steps, summary.drafted_tokens, summary.accepted_tokens, summary.acceptance_rate) == (2, 4, 3, 0.75)
    assert (summary.mean_tokens_per_step, summary.last_drafted, summary.reason) == (2.5, 0, "depth 0")
