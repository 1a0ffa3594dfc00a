"""The StreamingLLM draft cache (`specfleet.engine.streaming`): after a chunked prefill, after the window slid, after
drafts and rollbacks, its keys and values are those of one pass of ``transformers``' own forward over the same
tokens with the sink + window mask given explicitly, and its logits match that pass."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from specfleet.engine import Extend, UnknownSequenceError
from specfleet.engine.streaming import StreamingRunner, StreamingWindow

TOLERANCE = 1e-4
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=8192)
SMALL = StreamingWindow(sinks=4, window=12, reach=4, chunk=4)  # trims every 4 tokens or so: the tests slide it often


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_folder(request, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = Qwen2Config(**TINY) if request.param == "qwen2" else LlamaConfig(**TINY, rope_theta=500.0)
    folder = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@functools.cache
def _transformers_model(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def _reference(folder: Path, tokens: list[int], window: StreamingWindow
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``transformers``' logits [n, vocab] and per-layer keys and values [kv_heads, n, head_dim] for ``tokens``,
    each token attending to the sinks and to the last ``window.window`` positions only."""
    model = _transformers_model(folder)
    n = len(tokens)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    seen = (k <= q) & ((k < window.sinks) | (k > q - window.window))
    mask = torch.zeros(n, n).masked_fill(~seen, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        out = model(torch.tensor([tokens]), attention_mask=mask, use_cache=True)
    cache = out.past_key_values
    return out.logits[0], [layer.keys[0] for layer in cache.layers], [layer.values[0] for layer in cache.layers]


def _held_positions(runner: StreamingRunner, seq_id: str) -> list[int]:
    """The sequence position each held cache entry stands for: the sinks, then the window in order."""
    slot, sinks = runner._slots[seq_id], runner.window.sinks
    entries, evicted = runner.cache.lengths[slot], runner._evicted[slot]
    return [e if e < sinks else e + evicted for e in range(entries)]


def _assert_cache_matches(runner: StreamingRunner, seq_id: str, folder: Path, tokens: list[int]) -> None:
    _, keys, values = _reference(folder, tokens, runner.window)
    slot, held = runner._slots[seq_id], _held_positions(runner, seq_id)
    assert held == sorted(held) and held[-1] == len(tokens) - 1
    assert held[0] == 0 and set(range(max(0, len(tokens) - runner.window.window), len(tokens))) <= set(held)
    for layer in range(len(keys)):
        torch.testing.assert_close(runner.cache.keys[layer][slot, :, : len(held)], keys[layer][:, held],
                                   atol=TOLERANCE, rtol=TOLERANCE)
        torch.testing.assert_close(runner.cache.values[layer][slot, :, : len(held)], values[layer][:, held],
                                   atol=TOLERANCE, rtol=TOLERANCE)


def _tokens(n: int, seed: int = 1) -> list[int]:
    return [random.Random(seed + i).randrange(1, TINY["vocab_size"]) for i in range(n)]


def test_a_chunked_prefill_equals_one_masked_pass(tiny_folder: Path) -> None:
    runner = StreamingRunner.from_folder(tiny_folder, num_slots=2, max_seq_len=8192, window=SMALL)
    tokens = _tokens(61)  # neither a whole number of chunks nor of windows
    logits = runner.extend([Extend("a", 0, tokens, num_logits=3)])[0]
    reference, _, _ = _reference(tiny_folder, tokens, SMALL)
    torch.testing.assert_close(logits, reference[-3:], atol=TOLERANCE, rtol=TOLERANCE)
    assert runner.cached_len("a") == 61
    assert runner.held_entries("a") <= SMALL.capacity
    _assert_cache_matches(runner, "a", tiny_folder, tokens)


def test_drafting_rollback_and_sliding_keep_the_cache_exact(tiny_folder: Path) -> None:
    """Draft a few tokens, roll back past some of them, commit, over and over, with a second sequence in the
    same passes: each step's logits and the final cache are those of the masked pass over the committed tokens."""
    runner = StreamingRunner.from_folder(tiny_folder, num_slots=2, max_seq_len=8192, window=SMALL)
    rng = random.Random(7)
    committed = {"a": _tokens(9, seed=3), "b": _tokens(20, seed=5)}
    for seq_id, tokens in committed.items():
        runner.extend([Extend(seq_id, 0, tokens)])
    for _ in range(25):
        extends, drafts = [], {}
        for seq_id, tokens in committed.items():
            drafts[seq_id] = [rng.randrange(1, TINY["vocab_size"]) for _ in range(rng.randint(1, 4))]
            extends.append(Extend(seq_id, len(tokens), drafts[seq_id], num_logits=len(drafts[seq_id])))
        outs = runner.extend(extends)
        for (seq_id, tokens), out in zip(committed.items(), outs, strict=True):
            reference, _, _ = _reference(tiny_folder, tokens + drafts[seq_id], SMALL)
            torch.testing.assert_close(out, reference[len(tokens):], atol=TOLERANCE, rtol=TOLERANCE)
            kept = rng.randint(0, len(drafts[seq_id]))  # the verdict keeps some drafts; the next call rolls back
            tokens.extend(drafts[seq_id][:kept])
            assert runner.can_extend(seq_id, len(tokens))
    for seq_id, tokens in committed.items():
        runner.truncate(seq_id, len(tokens))
        assert runner._evicted[runner._slots[seq_id]] > 0, "the window never slid"
        _assert_cache_matches(runner, seq_id, tiny_folder, tokens)


def test_a_rollback_inside_the_window_restores_it(tiny_folder: Path) -> None:
    runner = StreamingRunner.from_folder(tiny_folder, num_slots=1, max_seq_len=8192, window=SMALL)
    tokens = _tokens(50)
    runner.extend([Extend("a", 0, tokens)])
    back = len(tokens) - SMALL.reach  # as far back as a trimmed window still allows
    assert runner.can_extend("a", back)
    runner.truncate("a", back)
    _assert_cache_matches(runner, "a", tiny_folder, tokens[:back])
    replacement = _tokens(3, seed=99)
    logits = runner.extend([Extend("a", back, replacement, num_logits=3)])[0]
    reference, _, _ = _reference(tiny_folder, tokens[:back] + replacement, SMALL)
    torch.testing.assert_close(logits, reference[-3:], atol=TOLERANCE, rtol=TOLERANCE)


def test_a_rollback_behind_the_trimmed_window_is_an_unknown_sequence(tiny_folder: Path) -> None:
    runner = StreamingRunner.from_folder(tiny_folder, num_slots=1, max_seq_len=8192, window=SMALL)
    runner.extend([Extend("a", 0, _tokens(50))])
    assert not runner.can_extend("a", 20)
    with pytest.raises(UnknownSequenceError):
        runner.extend([Extend("a", 20, [1])])
    assert runner.extend([Extend("a", 0, [1, 2, 3])])[0].shape[0] == 1  # starting over always works
    assert runner.cached_len("a") == 3 and runner._evicted[runner._slots["a"]] == 0


def test_an_8k_sequence_holds_a_bounded_cache(tmp_path: Path) -> None:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).save_pretrained(tmp_path)
    window = StreamingWindow()  # the service's defaults: 16 sinks, a 240-token window
    runner = StreamingRunner.from_folder(tmp_path, num_slots=1, max_seq_len=8192, window=window)
    runner.extend([Extend("a", 0, _tokens(8000))])
    for position in range(8000, 8192, 4):  # decode on in steps of 4, as a drafting sequence would
        runner.extend([Extend("a", position, _tokens(4, seed=position), num_logits=4)])
    assert runner.cached_len("a") == 8192
    assert runner.held_entries("a") <= window.sinks + window.window + window.reach + window.chunk
    assert runner.cache.keys[0].shape[2] == window.capacity  # the whole allocation, whatever the context
    with pytest.raises(ValueError, match="8192-token context"):
        runner.extend([Extend("a", 8192, [1])])


def test_a_model_with_its_own_sliding_window_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(MistralConfig(**TINY, sliding_window=5)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="own sliding window"):
        StreamingRunner.from_folder(tmp_path, num_slots=1, max_seq_len=64)


def test_a_chats_next_turn_continues_from_the_slid_window_of_the_last(tiny_folder: Path) -> None:
    """A finished sequence's slot keeps its sinks and window: a next turn that resends it with more tokens after it
    computes only those (exactly: the cache then equals the masked pass over the whole turn); a prompt that shares
    only an early part, whose window is gone, is computed in full."""
    runner = StreamingRunner.from_folder(tiny_folder, num_slots=2, max_seq_len=8192, window=SMALL)
    turn = _tokens(50)
    runner.extend([Extend("turn-1", 0, turn)])
    for token in _tokens(6, seed=40):  # the answer, a token a step
        runner.extend([Extend("turn-1", len(turn), [token])])
        turn.append(token)
    assert runner._evicted[runner._slots["turn-1"]] > 0, "the window never slid"
    runner.release(["turn-1"])

    computed = []
    forward = runner.model.forward
    runner.model.forward = lambda ids, *a, **k: computed.append(ids.numel()) or forward(ids, *a, **k)
    next_turn = turn + _tokens(5, seed=70)
    logits = runner.extend([Extend("turn-2", 0, next_turn, num_logits=2)])[0]
    assert sum(computed) == 5 and runner.reused_tokens == len(turn)
    reference, _, _ = _reference(tiny_folder, next_turn, SMALL)
    torch.testing.assert_close(logits, reference[-2:], atol=TOLERANCE, rtol=TOLERANCE)
    _assert_cache_matches(runner, "turn-2", tiny_folder, next_turn)

    computed.clear()
    early = turn[:20] + _tokens(5, seed=90)
    logits = runner.extend([Extend("early", 0, early)])[0]
    assert sum(computed) == len(early) and runner.reused_tokens == len(turn)
    reference, _, _ = _reference(tiny_folder, early, SMALL)
    torch.testing.assert_close(logits, reference[-1:], atol=TOLERANCE, rtol=TOLERANCE)
    _assert_cache_matches(runner, "early", tiny_folder, early)
