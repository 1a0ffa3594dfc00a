"""Lookahead decoding in the target's verifier: candidates from each sequence's n-gram pool verified, and a Jacobi
chain run, in one pass. Greedy output is plain decoding's, batched; the cache holds exactly the committed tokens;
sampled output keeps the model's distribution, and a verifier that sends a q other than the point mass its looked-up
candidates come from is caught by the same test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from chi_square import chi_square_pvalue
from self_drafting_harness import (
    PROMPTS,
    TRIALS,
    exact_first_three,
    make_tiny_folder,
    plain_greedy,
    sampled_first_three,
    self_drafted_decode,
    sending_a_spread_out_q,
    tiny_runner,
)

from specfleet.lookahead import LookaheadState, advance, candidates_after, lookahead_layout
from specfleet.trees.shapes import ROOT_PARENT
from target_service.self_drafting import LookaheadDrafting
from target_service.verifier import Verifier


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def exact_joint(tiny_folder: Path) -> torch.Tensor:
    return exact_first_three(tiny_folder, PROMPTS[1])


def test_the_pass_chains_the_candidates_and_the_jacobi_guesses_from_the_root() -> None:
    layout = lookahead_layout([7, 8], [1, 2, 3])
    assert layout.tokens == [7, 8, 1, 2, 3]
    assert layout.parents == [ROOT_PARENT, 0, ROOT_PARENT, 2, 3]
    assert list(layout.guess_rows) == [3, 4, 5]


def test_an_iteration_fills_the_pool_with_its_ngrams_and_moves_the_guesses_past_the_committed_tokens() -> None:
    state = LookaheadState([1, 2, 3, 4])
    # The root's output, then the output at each guess: the iteration's tokens for the 5 places after the root.
    advance(state, 10, [11, 12, 13, 14], emitted=[10, 11], ngram=3, pool_size=2)
    assert state.pool == {10: [(11, 12)], 11: [(12, 13)], 12: [(13, 14)]}
    assert state.guesses[:3] == [12, 13, 14] and len(state.guesses) == 4  # the last guess refilled from the context
    assert candidates_after(state, 11, 2) == (12, 13)
    advance(state, 12, [20, 21, 22, 23], emitted=[12], ngram=3, pool_size=2)
    assert state.pool[12] == [(13, 14), (20, 21)]  # the latest last, at most pool_size
    assert candidates_after(state, 12, 5) == (20, 21)
    assert candidates_after(state, 99, 2) == tuple(state.guesses[:2])  # nothing pooled: the Jacobi guesses


@pytest.mark.parametrize(("window", "ngram"), [(4, 3), (6, 5)])
def test_greedy_lookahead_decoding_is_token_identical_to_plain_decoding_batched(tiny_folder: Path, window: int,
                                                                                ngram: int) -> None:
    expected = plain_greedy(tiny_folder, PROMPTS, steps=24)
    verifier = Verifier(tiny_runner(tiny_folder), LookaheadDrafting(window, ngram))
    got, history = self_drafted_decode(verifier, PROMPTS, 24, ngram - 1, check_cache=True)
    assert got == expected
    assert sum(v.accepted for v in history) > 0  # candidates from the pool were accepted
    assert verifier.self_drafting == "lookahead" and verifier.max_draft_next == ngram - 1
    verifier.release([f"s{n}" for n in range(len(PROMPTS))])
    assert not verifier.drafting.states and verifier.runner.live_sequences == 0


_WrongQ = sending_a_spread_out_q(LookaheadDrafting)


def test_sampled_lookahead_decoding_keeps_the_models_distribution(tiny_folder: Path, exact_joint: torch.Tensor
                                                                  ) -> None:
    verifier = Verifier(tiny_runner(tiny_folder, slots=500), LookaheadDrafting(window=4, ngram=3))
    counts = sampled_first_three(verifier, PROMPTS[1], masks=2)
    assert chi_square_pvalue(counts, exact_joint * TRIALS) > 1e-3


def test_the_same_test_catches_a_lookahead_verifier_that_sends_the_wrong_q(tiny_folder: Path,
                                                                          exact_joint: torch.Tensor) -> None:
    verifier = Verifier(tiny_runner(tiny_folder, slots=500), _WrongQ(window=4, ngram=3))
    counts = sampled_first_three(verifier, PROMPTS[1], masks=2)
    assert chi_square_pvalue(counts, exact_joint * TRIALS) < 1e-6
