"""What the SPACE and lookahead verifier tests share: an untrained tiny model with a 16-token vocabulary, plain and
self-drafted greedy decoding loops over a `Verifier`, the exact joint of the first three sampled tokens and a sampler
that draws them through the self-drafting path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from specfleet.engine import Extend, ModelRunner
from specfleet.engine.runner import load_model
from specfleet.sampling import processed_probs
from specfleet.sampling_params import SamplingParams
from target_service.verifier import Verdict, Verifier, VerifyItem

GREEDY = SamplingParams()
MASK = 5  # any token: an untrained model has no mask token of its own
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], [1, 6, 1, 8, 0, 3, 3, 9, 8, 8], [4, 4, 4], [9, 8, 7, 6, 5],
           [1, 2], [6, 0, 2, 2, 1, 4, 0], [7, 7, 3, 1]]


SAMPLED = SamplingParams(temperature=1.0)
TRIALS = 6000




def make_tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.3)  # peaked distributions: greedy runs repeat, candidates get accepted
    folder = tmp_path_factory.mktemp("tiny-space")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def tiny_runner(folder: Path, slots: int = 16, max_seq_len: int = 96) -> ModelRunner:
    return ModelRunner(load_model(folder, dtype=torch.float32), num_slots=slots, max_seq_len=max_seq_len)


def plain_greedy(folder: Path, prompts: list[list[int]], steps: int) -> list[list[int]]:
    verifier = Verifier(tiny_runner(folder))
    outputs = [list(p) for p in prompts]
    cached = [0] * len(prompts)
    for _ in range(steps):
        verdicts = verifier.verify([VerifyItem(f"s{n}", cached[n], out[cached[n]:], [], None, GREEDY)
                                    for n, out in enumerate(outputs)])
        for n, v in enumerate(verdicts):
            outputs[n].extend(v.tokens)
            cached[n] = v.cached_len
    return [out[len(p):] for out, p in zip(outputs, prompts, strict=True)]


def self_drafted_decode(verifier: Verifier, prompts: list[list[int]], new_tokens: int, masks: int,
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
            if verifier.self_drafting == "space":
                assert len(verdict.next_tokens) == masks
            candidates[n] = (verdict.next_tokens, verdict.next_top_k)
            if check_cache:
                assert_cache_holds(verifier.runner, f"s{n}", outputs[n][:cached[n]])
    return [out[len(p):len(p) + new_tokens] for out, p in zip(outputs, prompts, strict=True)], history


def assert_cache_holds(runner: ModelRunner, seq_id: str, tokens: list[int]) -> None:
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


def exact_first_three(folder: Path, prompt: list[int]) -> torch.Tensor:
    """[V, V, V]: the model's exact joint of its first three sampled tokens after ``prompt``."""
    model = tiny_runner(folder, slots=1 + 16 + 256)
    vocab = 16
    params = (torch.ones(1), torch.zeros(1, dtype=torch.long), torch.ones(1))

    def dist(tokens: list[int], name: str) -> torch.Tensor:
        logits, = model.extend([Extend(name, 0, tokens)])
        return processed_probs(logits, *params)[0]

    p1 = dist(prompt, "p")
    joint = torch.zeros(vocab, vocab, vocab, dtype=torch.float64)
    for a in range(vocab):
        p2 = dist(prompt + [a], f"a{a}")
        for b in range(vocab):
            p3 = dist(prompt + [a, b], f"b{a}.{b}")
            joint[a, b] = p1[a].double() * p2[b].double() * p3.double()
    return joint


def sampled_first_three(verifier: Verifier, prompt: list[int], masks: int) -> torch.Tensor:
    counts = torch.zeros(16, 16, 16, dtype=torch.float64)
    batch = 500
    for start in range(0, TRIALS, batch):
        seeds = list(range(start, start + batch))
        got, _ = self_drafted_decode(verifier, [prompt] * batch, 3, masks, SAMPLED, seeds)
        for a, b, c in got:
            counts[a, b, c] += 1
        verifier.runner.release([f"s{n}" for n in range(batch)])
    return counts


def sending_a_spread_out_q(drafting: type) -> type:
    """A subclass of a self-drafting kind whose candidates are looked up (a point-mass q) that sends them with a
    spread-out q instead (a third each on the candidate and the two ids after it), as if drawn from it: the rejection
    test then weighs them wrongly, and a distribution test must catch it."""

    class SpreadOutQ(drafting):  # type: ignore[misc, valid-type]
        def next_drafts(self, item, nodes, logits, accepted, emitted):  # type: ignore[no-untyped-def]
            tokens, pairs = super().next_drafts(item, nodes, logits, accepted, emitted)
            if pairs is None:
                return tokens, pairs
            ids = torch.tensor([[t, (t + 1) % 16, (t + 2) % 16] for t in tokens])
            return tokens, (ids, torch.full(ids.shape, 1 / 3))

    return SpreadOutQ
