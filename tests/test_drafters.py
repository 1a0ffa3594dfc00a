"""Drafters in process: prompt lookup, sessions and rollback."""

from __future__ import annotations

from specfleet.drafters import DraftRequest, NgramDrafter, find_continuation
from specfleet.sampling import SamplingParams

GREEDY = SamplingParams()


def test_find_continuation_prefers_longest_then_most_recent() -> None:
    #           0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 2, 3, 4, 5, 1, 2, 3]
    # suffix [1, 2, 3] occurs at 0 -> continues with 9, 2, 3
    assert find_continuation(tokens, 3) == [9, 2, 3]
    # with only 2-grams allowed, the most recent [2, 3] before the suffix is at 4 -> 4, 5
    assert find_continuation(tokens, 2, max_ngram=2) == [4, 5]


def test_find_continuation_no_match_and_short_tail() -> None:
    assert find_continuation([1, 2, 3], 4) == []
    assert find_continuation([5, 6, 5], 4) == [6, 5]
    assert find_continuation([], 3) == []


def test_ngram_sessions_roll_back_and_report_unknown() -> None:
    drafter = NgramDrafter()
    [first] = drafter.propose([DraftRequest("s", 0, [1, 2, 3, 1, 2], 2, GREEDY)])
    assert first.known and first.tokens == [3, 1] and first.cached_len == 5 and first.draft_probs is None
    # One draft accepted plus a target token: roll back to 5 and append [3, 7].
    [second] = drafter.propose([DraftRequest("s", 5, [3, 7], 2, GREEDY)])
    assert second.cached_len == 7
    [ghost] = drafter.propose([DraftRequest("ghost", 4, [1], 2, GREEDY)])
    assert not ghost.known
    assert drafter.release(["s", "ghost"]) == 1 and drafter.live_sequences == 0


def test_ngram_sampled_drafts_carry_point_masses() -> None:
    [result] = NgramDrafter().propose([DraftRequest("s", 0, [4, 5, 6, 4, 5], 2, SamplingParams(temperature=1.0))])
    ids, probs = result.draft_probs
    assert ids.tolist() == [[6], [4]] and probs.tolist() == [[1.0], [1.0]]
