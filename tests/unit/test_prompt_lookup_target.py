"""Prompt lookup in the target's verifier (`--prompt-lookup-depth`): each verdict brings the next step's candidates,
looked up in the sequence's own text once the step's tokens are known. Greedy output is plain decoding's, batched,
and the cache holds exactly the committed tokens; the text is kept through steps that do not ask for drafts; sampled
output keeps the model's distribution, and a verifier that sends a q other than the looked-up point mass is caught
by the same test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from chi_square import chi_square_pvalue
from self_drafting_harness import (
    GREEDY,
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

from specfleet.config import TargetConfig
from specfleet.drafters.ngram import find_continuation
from target_service.self_drafting import PromptLookupDrafting
from target_service.verifier import Verifier, VerifyItem


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def exact_joint(tiny_folder: Path) -> torch.Tensor:
    return exact_first_three(tiny_folder, PROMPTS[1])


@pytest.mark.parametrize("depth", [2, 5])
def test_greedy_prompt_lookup_is_token_identical_to_plain_decoding_batched(tiny_folder: Path, depth: int) -> None:
    expected = plain_greedy(tiny_folder, PROMPTS, steps=24)
    verifier = Verifier(tiny_runner(tiny_folder), PromptLookupDrafting(depth, max_ngram=3, min_ngram=1))
    got, history = self_drafted_decode(verifier, PROMPTS, 24, depth, check_cache=True)
    assert got == expected
    assert sum(v.accepted for v in history) > 0  # looked-up candidates were accepted
    assert all(len(v.next_tokens) <= depth for v in history)
    assert verifier.self_drafting == "ngram" and verifier.max_draft_next == depth
    assert verifier.fed_tokens(VerifyItem("x", 4, [1], [2, 3], None, GREEDY, draft_next=depth)) == 3  # no extra nodes
    verifier.release([f"s{n}" for n in range(len(PROMPTS))])
    assert not verifier.drafting.texts and verifier.runner.live_sequences == 0


def test_the_text_is_kept_through_steps_that_ask_for_no_drafts(tiny_folder: Path) -> None:
    """Plain steps (the policy chose depth 0) still record what they commit, so the next drafting step looks up in
    the whole text; a sequence whose text the target no longer holds drafts nothing until it is sent whole again."""
    verifier = Verifier(tiny_runner(tiny_folder), PromptLookupDrafting(4, max_ngram=3, min_ngram=1, max_sequences=2))
    text, cached = list(PROMPTS[0]), 0
    for step in range(8):
        ask = 4 if step % 3 == 2 else 0
        (verdict,) = verifier.verify([VerifyItem("s", cached, text[cached:], [], None, GREEDY, draft_next=ask)])
        text += verdict.tokens
        cached = verdict.cached_len
        assert verdict.next_tokens == (tuple(find_continuation(text, 4, 3, 1)) if ask else ())
    assert verifier.drafting.texts["s"] == text
    for other in ("t", "u"):  # two more sequences: "s"'s text is the oldest and goes
        verifier.verify([VerifyItem(other, 0, PROMPTS[1], [], None, GREEDY)])
    (verdict,) = verifier.verify([VerifyItem("s", cached, text[cached:], [], None, GREEDY, draft_next=4)])
    assert verdict.known and verdict.next_tokens == ()
    text += verdict.tokens
    (again,) = verifier.verify([VerifyItem("s", 0, text, [], None, GREEDY, draft_next=4)])
    assert again.next_tokens == tuple(find_continuation(text + list(again.tokens), 4, 3, 1))


def test_a_self_drafting_flag_is_refused_beside_another_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="choose one"):
        TargetConfig(prompt_lookup_depth=4, lookahead_window=4)
    with pytest.raises(ValueError, match="--prompt-lookup-depth must be in"):
        TargetConfig(prompt_lookup_depth=99)
    assert TargetConfig(backend="llamacpp", prompt_lookup_depth=4).prompt_lookup_depth == 4


_WrongQ = sending_a_spread_out_q(PromptLookupDrafting)


def test_sampled_prompt_lookup_keeps_the_models_distribution(tiny_folder: Path, exact_joint: torch.Tensor) -> None:
    verifier = Verifier(tiny_runner(tiny_folder, slots=500), PromptLookupDrafting(2, max_ngram=2, min_ngram=1))
    counts = sampled_first_three(verifier, PROMPTS[1], masks=2)
    assert chi_square_pvalue(counts, exact_joint * TRIALS) > 1e-3


def test_the_same_test_catches_a_prompt_lookup_verifier_that_sends_the_wrong_q(tiny_folder: Path,
                                                                              exact_joint: torch.Tensor) -> None:
    verifier = Verifier(tiny_runner(tiny_folder, slots=500), _WrongQ(2, max_ngram=2, min_ngram=1))
    counts = sampled_first_three(verifier, PROMPTS[1], masks=2)
    assert chi_square_pvalue(counts, exact_joint * TRIALS) < 1e-6
