"""Drafters in process: prompt lookup, the model drafter, sessions and rollback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from specfleet.drafters import DraftRequest, NgramDrafter, find_continuation
from specfleet.drafters.model import ModelDrafter
from specfleet.drafters.ngram import find_continuations
from specfleet.engine import ModelRunner
from specfleet.sampling_params import SamplingParams
from specfleet.trees.shapes import TreeShape

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
    assert first.known and first.tokens == [3, 1] and first.cached_len == 5 and first.draft_top_k is None
    # One draft accepted plus a target token: roll back to 5 and append [3, 7].
    [second] = drafter.propose([DraftRequest("s", 5, [3, 7], 2, GREEDY)])
    assert second.cached_len == 7
    [ghost] = drafter.propose([DraftRequest("ghost", 4, [1], 2, GREEDY)])
    assert not ghost.known
    assert drafter.release(["s", "ghost"]) == 1 and drafter.live_sequences == 0


def test_ngram_sampled_drafts_carry_point_masses() -> None:
    [result] = NgramDrafter().propose([DraftRequest("s", 0, [4, 5, 6, 4, 5], 2, SamplingParams(temperature=1.0))])
    ids, probs = result.draft_top_k
    assert ids.tolist() == [[6], [4]] and probs.tolist() == [[1.0], [1.0]]



def test_model_drafter_rejects_another_vocabulary(tiny_model: Path) -> None:
    runner = ModelRunner.from_folder(tiny_model, num_slots=2, max_seq_len=64)
    with pytest.raises(ValueError, match=r"vocabulary \(97 tokens\) differs from the target's \(49152\)"):
        ModelDrafter(runner, target_vocab_size=49152)


def test_model_drafter_greedy_equals_transformers_generate(tiny_model: Path) -> None:
    """Batched drafting of ragged sequences, with rollback between calls, drafts what greedy
    decoding with transformers would produce."""
    prompts = {"a": [3, 14, 15, 92, 65], "b": [35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79]}
    reference_model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def reference(tokens: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = reference_model.generate(torch.tensor([tokens]), max_new_tokens=n, do_sample=False)
        return out[0, len(tokens):].tolist()

    drafter = ModelDrafter(ModelRunner.from_folder(tiny_model, num_slots=4, max_seq_len=64), target_vocab_size=97)
    first = drafter.propose([DraftRequest(name, 0, toks, 4, GREEDY) for name, toks in prompts.items()])
    for result, toks in zip(first, prompts.values(), strict=True):
        assert result.known and result.tokens == reference(toks, 4) and result.draft_top_k is None
    # The target accepted one draft of each and added token 7: roll back past the other drafts.
    grown = {name: toks + [r.tokens[0], 7] for (name, toks), r in zip(prompts.items(), first, strict=True)}
    second = drafter.propose([DraftRequest(name, len(prompts[name]), toks[-2:], 3, GREEDY)
                              for name, toks in grown.items()])
    for result, toks in zip(second, grown.values(), strict=True):
        assert result.tokens == reference(toks, 3)


def test_model_drafter_sampled_drafts_come_from_their_pairs(tiny_model: Path) -> None:
    drafter = ModelDrafter(ModelRunner.from_folder(tiny_model, num_slots=2, max_seq_len=64), top_k_pairs=16)
    request = DraftRequest("s", 0, [1, 2, 3], 5, SamplingParams(temperature=1.0, top_p=0.9), seed=7)
    [result] = drafter.propose([request])
    ids, probs = result.draft_top_k
    assert ids.shape == probs.shape == (5, 16)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    for row, token in enumerate(result.tokens):
        assert probs[row][ids[row] == token].sum() > 0  # each draft token has mass under its q
    drafter.release(["s"])
    [again] = drafter.propose([request])
    assert again.tokens == result.tokens  # seeded: same request, same drafts


# -- trees ------------------------------------------------------------------------------------------


def test_find_continuations_merges_distinct_matches_within_the_budget() -> None:
    #         0  1  2  3  4  5  6  7  8  9 10 11 12 13 14
    tokens = [1, 2, 3, 9, 2, 3, 4, 5, 1, 2, 3, 7, 7, 2, 3]
    # Suffix [2, 3] occurs at 9, 4 and 1 (most recent first); the 1-gram [3] adds nothing new.
    assert find_continuations(tokens, 3, 20, max_ngram=3, min_ngram=1) == [[7, 7, 2], [4, 5, 1], [9, 2, 3]]
    assert find_continuations(tokens, 3, 4, max_ngram=3, min_ngram=1) == [[7, 7, 2], [4]]
    assert find_continuations(tokens, 3, 20)[0] == find_continuation(tokens, 3)
    assert find_continuations([1, 2, 3], 3, 8) == []


def test_ngram_tree_is_a_trie_of_point_masses_and_keeps_the_session() -> None:
    drafter = NgramDrafter(min_ngram=1)
    tokens = [1, 2, 3, 9, 2, 3, 4, 5, 1, 2, 3, 7, 7, 2, 3]
    request = DraftRequest("s", 0, tokens, 3, SamplingParams(temperature=1.0), tree=TreeShape("rsd-c", (2, 2, 2)),
                           max_nodes=7)
    [result] = drafter.propose([request])
    assert result.tokens == [7, 7, 2, 4, 5, 1, 9] and result.parents == [-1, 0, 1, -1, 3, 4, -1]
    ids, probs = result.draft_top_k
    assert ids.view(-1).tolist() == result.tokens and probs.view(-1).tolist() == [1.0] * 7
    assert result.cached_len == len(tokens)
    # Next step: node 0 accepted and a target token: the session rolls back and continues as for chains.
    [after] = drafter.propose([DraftRequest("s", len(tokens), [7, 1], 2, GREEDY)])
    assert after.known and after.cached_len == len(tokens) + 2 and after.parents is None


def _reference_greedy(folder: Path, tokens: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), max_new_tokens=n, do_sample=False)
    return out[0, len(tokens):].tolist()


@pytest.mark.parametrize("shape", [TreeShape("rsd-c", (2, 2, 1)), TreeShape("rsd-s", beam_width=3, depth=3)])
def test_model_drafter_greedy_tree_holds_the_greedy_chain_and_rolls_back(tiny_model: Path, shape: TreeShape) -> None:
    """A greedy tree's first-drawn children follow the draft's greedy continuation; afterwards the cache
    holds just the committed tokens, so the next call (a chain here) drafts as if no tree had been built."""
    prompts = {"a": [3, 14, 15, 92, 65], "b": [35, 89, 79, 32, 38, 46, 26, 43]}
    drafter = ModelDrafter(ModelRunner.from_folder(tiny_model, num_slots=4, max_seq_len=64))
    results = drafter.propose([DraftRequest(name, 0, toks, 3, GREEDY, tree=shape) for name, toks in prompts.items()])
    for result, toks in zip(results, prompts.values(), strict=True):
        assert result.known and result.cached_len == len(toks) and result.draft_top_k is None
        assert len(result.tokens) == len(result.parents) <= shape.nodes
        first_path, node = [], -1
        while node in result.parents:
            node = result.parents.index(node)  # the first child drawn
            first_path.append(result.tokens[node])
        assert first_path == _reference_greedy(tiny_model, toks, 3)
    grown = {name: toks + [r.tokens[0], 7] for (name, toks), r in zip(prompts.items(), results, strict=True)}
    again = drafter.propose([DraftRequest(name, len(prompts[name]), toks[-2:], 3, GREEDY)
                             for name, toks in grown.items()])
    for result, toks in zip(again, grown.values(), strict=True):
        assert result.parents is None and result.tokens == _reference_greedy(tiny_model, toks, 3)


def test_model_drafter_sampled_tree_is_exact_and_seeded_per_sequence(tiny_model: Path) -> None:
    drafter = ModelDrafter(ModelRunner.from_folder(tiny_model, num_slots=4, max_seq_len=64), top_k_pairs=16)
    sampling = SamplingParams(temperature=1.0)
    request = DraftRequest("s", 0, [1, 2, 3], 3, sampling, seed=5, tree=TreeShape("rsd-c", (3, 2)))
    [alone] = drafter.propose([request])
    ids, probs = alone.draft_top_k
    assert len(alone.tokens) == 9 and ids.shape == probs.shape == (9, 16)
    torch.testing.assert_close(probs.sum(-1), torch.ones(9))
    for row, token in enumerate(alone.tokens):
        assert probs[row][ids[row] == token].sum() > 0
    # Siblings are distinct and drawn without replacement: a later sibling's q excludes earlier ones.
    assert len(set(alone.tokens[:3])) == 3
    assert probs[1][ids[1] == alone.tokens[0]].sum() == 0
    drafter.release(["s"])
    other = DraftRequest("o", 0, [9, 8, 7, 6], 3, sampling, seed=1, tree=TreeShape("rsd-c", (3, 2)))
    batched = drafter.propose([other, request])[1]
    assert batched.tokens == alone.tokens and batched.parents == alone.parents
