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
from transformers import AutoModelForCausalLM, LlamaConfig

from specfleet.engine import Extend, ModelRunner
from specfleet.engine.runner import load_model
from specfleet.sampling import processed_probs
from specfleet.sampling_params import SamplingParams
from specfleet.space import space_layout, space_pass_tokens
from specfleet.trees.shapes import ROOT_PARENT
from target_service.verifier import SpaceSettings, Verdict, Verifier, VerifyItem

GREEDY = SamplingParams()
MASK = 5  # any token: an untrained model has no mask token of its own
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], [1, 6, 1, 8, 0, 3, 3, 9, 8, 8], [4, 4, 4], [9, 8, 7, 6, 5],
           [1, 2], [6, 0, 2, 2, 1, 4, 0], [7, 7, 3, 1]]


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
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.3)  # peaked distributions: greedy runs repeat, candidates get accepted
    folder = tmp_path_factory.mktemp("tiny-space")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _runner(folder: Path, slots: int = 16, max_seq_len: int = 96) -> ModelRunner:
    return ModelRunner(load_model(folder, dtype=torch.float32), num_slots=slots, max_seq_len=max_seq_len)


def _plain_greedy(folder: Path, prompts: list[list[int]], steps: int) -> list[list[int]]:
    verifier = Verifier(_runner(folder))
    outputs = [list(p) for p in prompts]
    cached = [0] * len(prompts)
    for _ in range(steps):
        verdicts = verifier.verify([VerifyItem(f"s{n}", cached[n], out[cached[n]:], [], None, GREEDY)
                                    for n, out in enumerate(outputs)])
        for n, v in enumerate(verdicts):
            outputs[n].extend(v.tokens)
            cached[n] = v.cached_len
    return [out[len(p):] for out, p in zip(outputs, prompts, strict=True)]


def _space_decode(verifier: Verifier, prompts: list[list[int]], new_tokens: int, masks: int,
                  sampling: SamplingParams = GREEDY, seeds: list[int] | None = None,
                  check_cache: bool = False) -> tuple[list[list[int]], list[Verdict]]:
    """Decodes every prompt to ``new_tokens`` tokens, each step verifying the candidates the previous one proposed."""
    outputs = [list(p) for p in prompts]
    cached = [0] * len(prompts)
    candidates: list[tuple[tuple[int, ...], tuple[torch.Tensor, torch.Tensor] | None]] = [((), None)] * len(prompts)
    history: list[Verdict] = []
    while any(len(out) - len(p) < new_tokens for out, p in zip(outputs, prompts, strict=True)):
        live = [n for n, (out, p) in enumerate(zip(outputs, prompts, strict=True)) if len(out) - len(p) < new_tokens]
        items = [VerifyItem(f"s{n}", cached[n], outputs[n][cached[n]:], list(candidates[n][0]), candidates[n][1],
                            sampling, seeds[n] if seeds else 0, draft_next=masks) for n in live]
        for n, verdict in zip(live, verifier.verify(items), strict=True):
            history.append(verdict)
            outputs[n].extend(verdict.tokens)
            cached[n] = verdict.cached_len
            assert cached[n] == len(outputs[n]) - 1  # the emitted token is not cached yet
            assert len(verdict.next_tokens) == masks
            candidates[n] = (verdict.next_tokens, verdict.next_top_k)
            if check_cache:
                _assert_cache_holds(verifier.runner, f"s{n}", outputs[n][:cached[n]])
    return [out[len(p):len(p) + new_tokens] for out, p in zip(outputs, prompts, strict=True)], history


def _assert_cache_holds(runner: ModelRunner, seq_id: str, tokens: list[int]) -> None:
    """The sequence's keys and values are exactly those of its committed tokens run plainly (no mask, no rejected
    candidate left in it), and its length is theirs."""
    assert runner.cached_len(seq_id) == len(tokens)
    fresh = ModelRunner(runner.model, num_slots=1, max_seq_len=runner.max_seq_len)
    fresh.extend([Extend("fresh", 0, tokens)])
    slot, fresh_slot = runner._slots[seq_id], fresh._slots["fresh"]
    for mine, theirs in ((runner.cache.keys, fresh.cache.keys), (runner.cache.values, fresh.cache.values)):
        for layer_mine, layer_theirs in zip(mine, theirs, strict=True):
            torch.testing.assert_close(layer_mine[slot, :, : len(tokens)], layer_theirs[fresh_slot, :, : len(tokens)],
                                       atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("masks", [1, 2, 4])
def test_greedy_space_decoding_is_token_identical_to_plain_decoding_batched(tiny_folder: Path, masks: int) -> None:
    expected = _plain_greedy(tiny_folder, PROMPTS, steps=24)
    verifier = Verifier(_runner(tiny_folder), SpaceSettings(mask_token=MASK, max_masks=4))
    got, history = _space_decode(verifier, PROMPTS, 24, masks)
    assert got == expected
    assert sum(v.accepted for v in history) > 0  # some candidates were accepted: the acceptance path ran


def test_after_each_step_the_cache_holds_exactly_the_committed_tokens(tiny_folder: Path) -> None:
    verifier = Verifier(_runner(tiny_folder), SpaceSettings(mask_token=MASK, max_masks=3))
    _space_decode(verifier, PROMPTS[:3], 12, masks=3, check_cache=True)


def test_the_next_candidates_come_from_the_mask_group_after_the_last_accepted_candidate(tiny_folder: Path) -> None:
    """Each accepted count g: the candidates equal the argmax at K masks appended, as a plain chain, after the
    committed tokens and the first g candidates."""
    prompt = PROMPTS[0]
    truth = _plain_greedy(tiny_folder, [prompt], steps=6)[0]
    for accepted in range(4):
        candidates = truth[:accepted] + [(truth[accepted] + 1) % 16] + truth[accepted + 1:3]  # wrong at `accepted`
        candidates = candidates[:3]
        verifier = Verifier(_runner(tiny_folder), SpaceSettings(mask_token=MASK, max_masks=4))
        verdict, = verifier.verify([VerifyItem("s", 0, prompt, candidates, None, GREEDY, draft_next=4)])
        assert verdict.accepted == min(accepted, 3)
        chain = _runner(tiny_folder)
        logits, = chain.extend([Extend("c", 0, prompt + candidates[:verdict.accepted] + [MASK] * 4, num_logits=4)])
        assert list(verdict.next_tokens) == logits.argmax(dim=-1).tolist()


def test_a_pass_that_would_outgrow_the_cache_drafts_fewer_next_candidates(tiny_folder: Path) -> None:
    verifier = Verifier(_runner(tiny_folder, max_seq_len=16), SpaceSettings(mask_token=MASK, max_masks=4))
    verdict, = verifier.verify([VerifyItem("s", 0, list(range(10)), [1, 2], None, GREEDY, draft_next=4)])
    assert len(verdict.next_tokens) == (16 - 10 - 2) // 3


def test_asking_a_target_without_space_for_next_drafts_is_a_clear_error(tiny_folder: Path) -> None:
    with pytest.raises(ValueError, match="not started with a SPACE model"):
        Verifier(_runner(tiny_folder)).verify([VerifyItem("s", 0, [1, 2], [], None, GREEDY, draft_next=2)])
    with pytest.raises(ValueError, match="drafts 2 at most"):
        Verifier(_runner(tiny_folder), SpaceSettings(MASK, 2)).verify(
            [VerifyItem("s", 0, [1, 2], [], None, GREEDY, draft_next=3)])


# -- sampled decoding keeps the model's distribution ----------------------------------------------------------------

SAMPLED = SamplingParams(temperature=1.0)
TRIALS = 6000


class _WrongQ(Verifier):
    """Sends with its candidates a q other than the one they were drawn from (the mask group after the root, whatever
    was accepted): the rejection test then weighs them wrongly."""

    def _next_candidates(self, item, layout, logits, accepted):  # type: ignore[no-untyped-def]
        tokens, pairs = super()._next_candidates(item, layout, logits, accepted)
        if pairs is None:
            return tokens, pairs
        ids, probs = pairs
        flat = torch.full_like(probs, 1.0 / probs.shape[-1])
        return tokens, (ids, flat)


def _exact_first_three(folder: Path, prompt: list[int]) -> torch.Tensor:
    """[V, V, V]: the model's exact joint of its first three sampled tokens after ``prompt``."""
    runner = _runner(folder, slots=1 + 16 + 256)
    vocab = 16
    params = (torch.ones(1), torch.zeros(1, dtype=torch.long), torch.ones(1))

    def dist(tokens: list[int], name: str) -> torch.Tensor:
        logits, = runner.extend([Extend(name, 0, tokens)])
        return processed_probs(logits, *params)[0]

    p1 = dist(prompt, "p")
    joint = torch.zeros(vocab, vocab, vocab, dtype=torch.float64)
    for a in range(vocab):
        p2 = dist(prompt + [a], f"a{a}")
        for b in range(vocab):
            p3 = dist(prompt + [a, b], f"b{a}.{b}")
            joint[a, b] = p1[a].double() * p2[b].double() * p3.double()
    return joint


def _sampled_first_three(verifier: Verifier, prompt: list[int], masks: int) -> torch.Tensor:
    counts = torch.zeros(16, 16, 16, dtype=torch.float64)
    batch = 500
    for start in range(0, TRIALS, batch):
        seeds = list(range(start, start + batch))
        got, _ = _space_decode(verifier, [prompt] * batch, 3, masks, SAMPLED, seeds)
        for a, b, c in got:
            counts[a, b, c] += 1
        verifier.runner.release([f"s{n}" for n in range(batch)])
    return counts


@pytest.fixture(scope="module")
def exact_joint(tiny_folder: Path) -> torch.Tensor:
    return _exact_first_three(tiny_folder, PROMPTS[1])


def test_sampled_space_decoding_keeps_the_models_distribution(tiny_folder: Path, exact_joint: torch.Tensor) -> None:
    verifier = Verifier(_runner(tiny_folder, slots=500), SpaceSettings(mask_token=MASK, max_masks=2))
    counts = _sampled_first_three(verifier, PROMPTS[1], masks=2)
    assert chi_square_pvalue(counts, exact_joint * TRIALS) > 1e-3


def test_the_same_test_catches_a_verifier_that_sends_the_wrong_q(tiny_folder: Path, exact_joint: torch.Tensor) -> None:
    verifier = _WrongQ(_runner(tiny_folder, slots=500), SpaceSettings(mask_token=MASK, max_masks=2))
    counts = _sampled_first_three(verifier, PROMPTS[1], masks=2)
    assert chi_square_pvalue(counts, exact_joint * TRIALS) < 1e-6
