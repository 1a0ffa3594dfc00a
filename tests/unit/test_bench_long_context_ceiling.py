"""The long-context ceiling's replay: a greedy chain keeps its drafts while the draft's choices are the output's."""

from __future__ import annotations

import pytest

from bench.long_context_ceiling import Replay, Row, replay

OUTPUT = [5, 1, 2, 3, 4, 9]  # the first token is the prefill's: chains start at the second
CHOICES = [5, 1, 2, 7, 4, 9]  # the draft's token at each position given the true ones before: wrong at 3 only


def test_a_chain_keeps_drafts_up_to_the_first_wrong_choice_and_the_depth() -> None:
    # Depth 2: drafts 1, 2 kept (+1 committed), then one draft left room for before the end, kept (+1).
    assert replay([OUTPUT], [CHOICES], 2) == Replay(steps=2, tokens=5, after_full=1)
    # Depth 1: 1 kept; 7 rejected (the target's 3 committed); 4 kept.
    assert replay([OUTPUT], [CHOICES], 1) == Replay(steps=3, tokens=5, after_full=1)


@pytest.mark.parametrize("depth", [1, 2, 3, 8])
def test_every_token_after_the_first_is_committed_once(depth: int) -> None:
    outputs = [OUTPUT, [3, 3, 3, 3], [8, 6]]
    choices = [CHOICES, [3, 0, 3, 0], [8, 6]]
    assert replay(outputs, choices, depth).tokens == sum(len(out) - 1 for out in outputs)


def test_a_draft_that_never_matches_commits_a_token_a_step() -> None:
    result = replay([OUTPUT], [[0] * len(OUTPUT)], 4)
    assert result.tokens_per_step == 1.0
    assert result.full_share == 0.0


def test_speedups_price_the_verify_alone_and_with_the_draft() -> None:
    row = Row(context=4096, batch=8, draft="float32", depth=2, tokens_per_step=2.0, plain_ms=50.0, verify_ms=80.0,
              draft_ms=20.0)
    assert row.free_draft_speedup == pytest.approx(2.0 * 50 / 80)
    assert row.speedup == pytest.approx(2.0 * 50 / 100)
