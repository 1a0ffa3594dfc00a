"""SPACE in the target's verifier: one pass verifies the candidates and drafts the next ones from mask groups.

An untrained tiny model stands in for a SPACE model: losslessness must not depend on what the masks learned.
Greedy decoding with the candidates the verifier proposes must be token-identical to plain decoding, batched, at
any mask count; after every step the cache holds exactly the committed tokens; the next candidates come from the
mask group after the last accepted candidate. Sampled decoding keeps the model's distribution (chi-square on a tiny
vocabulary), and a verifier that sends a q other than the one its candidates were drawn from is caught.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from chi_square import chi_square_pvalue
from self_drafting_harness import (
    GREEDY,
    MASK,
    PROMPTS,
    TRIALS,
    exact_first_three,
    make_tiny_folder,
    plain_greedy,
    sampled_first_three,
    self_drafted_decode,
    tiny_runner,
)

from specfleet.engine import Extend
from specfleet.space import space_layout, space_pass_tokens
from specfleet.trees.shapes import ROOT_PARENT
from target_service.self_drafting import SpaceDrafting
from target_service.verifier import Verifier, VerifyItem


def test_the_layout_chains_the_candidates_and_hangs_a_mask_group_after_the_root_and_each_candidate() -> None:
    layout = space_layout([11, 12], masks=3, mask_token=MASK)
    assert layout.tokens == [11, 12] + [MASK] * 9
    assert layout.parents == [ROOT_PARENT, 0,  # c1, c2
                              ROOT_PARENT, 2, 3,  # masks after the root
                              0, 5, 6,  # after c1
                              1, 8, 9]  # after c2
    assert list(layout.group_rows(0)) == [3, 4, 5]  # logits rows: 0 the root, j + 1 node j
    assert list(layout.group_rows(2)) == [9, 10, 11]
    assert layout.kept_nodes(1) == [0]
    assert space_pass_tokens(2, 3) == len(layout.tokens)
    assert space_layout([], masks=2, mask_token=MASK).parents == [ROOT_PARENT, 0]
    with pytest.raises(ValueError, match="accepted"):
        layout.group_rows(3)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def exact_joint(tiny_folder: Path) -> torch.Tensor:
    return exact_first_three(tiny_folder, PROMPTS[1])


@pytest.mark.parametrize("masks", [1, 2, 4])
def test_greedy_space_decoding_is_token_identical_to_plain_decoding_batched(tiny_folder: Path, masks: int) -> None:
    expected = plain_greedy(tiny_folder, PROMPTS, steps=24)
    verifier = Verifier(tiny_runner(tiny_folder), SpaceDrafting(mask_token=MASK, max_masks=4))
    got, history = self_drafted_decode(verifier, PROMPTS, 24, masks)
    assert got == expected
    assert sum(v.accepted for v in history) > 0  # some candidates were accepted: the acceptance path ran


def test_after_each_step_the_cache_holds_exactly_the_committed_tokens(tiny_folder: Path) -> None:
    verifier = Verifier(tiny_runner(tiny_folder), SpaceDrafting(mask_token=MASK, max_masks=3))
    self_drafted_decode(verifier, PROMPTS[:3], 12, masks=3, check_cache=True)


def test_the_next_candidates_come_from_the_mask_group_after_the_last_accepted_candidate(tiny_folder: Path) -> None:
    """Each accepted count g: the candidates equal the argmax at K masks appended, as a plain chain, after the
    committed tokens and the first g candidates."""
    prompt = PROMPTS[0]
    truth = plain_greedy(tiny_folder, [prompt], steps=6)[0]
    for accepted in range(4):
        candidates = truth[:accepted] + [(truth[accepted] + 1) % 16] + truth[accepted + 1:3]  # wrong at `accepted`
        candidates = candidates[:3]
        verifier = Verifier(tiny_runner(tiny_folder), SpaceDrafting(mask_token=MASK, max_masks=4))
        verdict, = verifier.verify([VerifyItem("s", 0, prompt, candidates, None, GREEDY, draft_next=4)])
        assert verdict.accepted == min(accepted, 3)
        chain = tiny_runner(tiny_folder)
        logits, = chain.extend([Extend("c", 0, prompt + candidates[:verdict.accepted] + [MASK] * 4, num_logits=4)])
        assert list(verdict.next_tokens) == logits.argmax(dim=-1).tolist()


def test_a_pass_that_would_outgrow_the_cache_drafts_fewer_next_candidates(tiny_folder: Path) -> None:
    verifier = Verifier(tiny_runner(tiny_folder, max_seq_len=16), SpaceDrafting(mask_token=MASK, max_masks=4))
    verdict, = verifier.verify([VerifyItem("s", 0, list(range(10)), [1, 2], None, GREEDY, draft_next=4)])
    assert len(verdict.next_tokens) == (16 - 10 - 2) // 3


def test_asking_a_target_without_space_for_next_drafts_is_a_clear_error(tiny_folder: Path) -> None:
    with pytest.raises(ValueError, match="not started with a SPACE model"):
        Verifier(tiny_runner(tiny_folder)).verify([VerifyItem("s", 0, [1, 2], [], None, GREEDY, draft_next=2)])
    with pytest.raises(ValueError, match="drafts 2 at most"):
        Verifier(tiny_runner(tiny_folder), SpaceDrafting(MASK, 2)).verify(
            [VerifyItem("s", 0, [1, 2], [], None, GREEDY, draft_next=3)])


# -- sampled decoding keeps the model's distribution ----------------------------------------------------------------

class _WrongQ(SpaceDrafting):
    """Sends with its candidates a q other than the one they were drawn from (a flat one over the same tokens): the
    rejection test then weighs them wrongly."""

    def next_drafts(self, item, nodes, logits, accepted, emitted):  # type: ignore[no-untyped-def]
        tokens, pairs = super().next_drafts(item, nodes, logits, accepted, emitted)
        if pairs is None:
            return tokens, pairs
        ids, probs = pairs
        return tokens, (ids, torch.full_like(probs, 1.0 / probs.shape[-1]))


def test_sampled_space_decoding_keeps_the_models_distribution(tiny_folder: Path, exact_joint: torch.Tensor) -> None:
    verifier = Verifier(tiny_runner(tiny_folder, slots=500), SpaceDrafting(mask_token=MASK, max_masks=2))
    counts = sampled_first_three(verifier, PROMPTS[1], masks=2)
    assert chi_square_pvalue(counts, exact_joint * TRIALS) > 1e-3


def test_the_same_test_catches_a_verifier_that_sends_the_wrong_q(tiny_folder: Path, exact_joint: torch.Tensor) -> None:
    verifier = Verifier(tiny_runner(tiny_folder, slots=500), _WrongQ(mask_token=MASK, max_masks=2))
    counts = sampled_first_three(verifier, PROMPTS[1], masks=2)
    assert chi_square_pvalue(counts, exact_joint * TRIALS) < 1e-6
