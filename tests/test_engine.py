"""Our Llama-family forward over the slot KV cache matches the transformers forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from specfleet.engine import Extend, LlamaForCausalLM, ModelRunner, SlotKVCache, UnknownSequenceError

TOLERANCE = 1e-4


def _save_tiny(folder: Path, config) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama-tied"])
def tiny_folder(request, tmp_path_factory) -> Path:
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if request.param == "qwen2":
        config = Qwen2Config(**common, rope_theta=10000.0)
    else:
        config = LlamaConfig(**common, rope_theta=50000.0, tie_word_embeddings=request.param == "llama-tied")
    return _save_tiny(tmp_path_factory.mktemp(request.param), config)


def _reference_logits(folder: Path, tokens: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def test_prefill_matches_transformers(tiny_folder: Path) -> None:
    tokens = [5, 17, 3, 88, 42, 9, 1, 60]
    runner = ModelRunner.from_folder(tiny_folder, num_slots=2, max_seq_len=64)
    [ours] = runner.extend([Extend("a", 0, tokens, num_logits=len(tokens))])
    torch.testing.assert_close(ours, _reference_logits(tiny_folder, tokens), atol=TOLERANCE, rtol=TOLERANCE)


def test_ragged_batch_truncate_and_extend_match_transformers(tiny_folder: Path) -> None:
    g = torch.Generator().manual_seed(1)
    seqs = {name: torch.randint(0, 97, (n,), generator=g).tolist() for name, n in
            [("short", 3), ("mid", 11), ("long", 29)]}
    runner = ModelRunner.from_folder(tiny_folder, num_slots=4, max_seq_len=64)
    # Prefill all three at once with ragged lengths, then decode them in ragged steps.
    runner.extend([Extend(name, 0, toks[:-2], num_logits=1) for name, toks in seqs.items()])
    # Append two "draft" tokens that will be rolled back, plus real ones.
    runner.extend([Extend(name, len(toks) - 2, [7, 8], num_logits=2) for name, toks in seqs.items()])
    outs = runner.extend([Extend(name, len(toks) - 2, toks[-2:], num_logits=2) for name, toks in seqs.items()])
    for (_name, toks), ours in zip(seqs.items(), outs, strict=True):
        reference = _reference_logits(tiny_folder, toks)[-2:]
        torch.testing.assert_close(ours, reference, atol=TOLERANCE, rtol=TOLERANCE)
        assert runner.cached_len(_name) == len(toks)


def test_unknown_sequence_and_release(tiny_folder: Path) -> None:
    runner = ModelRunner.from_folder(tiny_folder, num_slots=2, max_seq_len=32)
    with pytest.raises(UnknownSequenceError):
        runner.extend([Extend("ghost", 4, [1], num_logits=1)])
    runner.extend([Extend("a", 0, [1, 2, 3])])
    assert runner.live_sequences == 1 and runner.cache.num_free == 1
    assert runner.release(["a", "ghost"]) == 1
    assert runner.live_sequences == 0 and runner.cache.num_free == 2
    with pytest.raises(ValueError, match="exceed"):
        runner.extend([Extend("b", 0, list(range(33)))])


def test_lru_eviction_spares_the_current_batch(tiny_folder: Path) -> None:
    runner = ModelRunner.from_folder(tiny_folder, num_slots=2, max_seq_len=32)
    runner.extend([Extend("old", 0, [1, 2])])
    runner.extend([Extend("recent", 0, [3, 4])])
    runner.extend([Extend("new", 0, [5, 6])])
    assert runner.cached_len("old") is None  # evicted, least recently used
    assert runner.cached_len("recent") == 2 and runner.cached_len("new") == 2


def test_rollback_is_a_length() -> None:
    cache = SlotKVCache(num_layers=1, num_slots=2, max_seq_len=8, num_kv_heads=1, head_dim=2)
    slot = cache.allocate()
    cache.lengths[slot] = 5
    cache.truncate(slot, 2)
    assert cache.lengths[slot] == 2
    with pytest.raises(ValueError):
        cache.truncate(slot, 3)
    cache.free(slot)
    assert cache.num_free == 2


def test_loads_real_tied_checkpoint_names(tiny_folder: Path) -> None:
    model = LlamaForCausalLM.from_folder(tiny_folder)
    if model.cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.real_model
def test_real_smollm2_ragged_truncate_and_extend_match_transformers(smollm2_dir: Path) -> None:
    """The real SmolLM2-135M: three prompts of different lengths in one batch, then a rejected draft
    rolled back and replaced, compared with transformers' forward over each whole sequence."""
    g = torch.Generator().manual_seed(2)
    seqs = {name: torch.randint(0, 49152, (n,), generator=g).tolist() for name, n in
            [("short", 5), ("mid", 23), ("long", 61)]}
    runner = ModelRunner.from_folder(smollm2_dir, num_slots=4, max_seq_len=128)
    runner.extend([Extend(name, 0, toks[:-3], num_logits=1) for name, toks in seqs.items()])
    runner.extend([Extend(name, len(toks) - 3, [11, 12, 13, 14], num_logits=4) for name, toks in seqs.items()])
    outs = runner.extend([Extend(name, len(toks) - 3, toks[-3:], num_logits=3) for name, toks in seqs.items()])
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for (name, toks), ours in zip(seqs.items(), outs, strict=True):
        with torch.no_grad():
            reference = model(torch.tensor([toks])).logits[0, -3:]
        # Real weights have logits of magnitude ~30; float32 reductions in another order differ by ~1e-4.
        torch.testing.assert_close(ours, reference, atol=2e-3, rtol=1e-4)
        assert torch.equal(ours.argmax(-1), reference.argmax(-1))
        assert runner.cached_len(name) == len(toks)
