"""Our Llama-family forward over the slot KV cache matches the transformers forward.

Every test taking ``tiny_folder`` runs on each architecture and feature below, built tiny and random with
``transformers`` (prefill, ragged batches, rollback, draft trees and kept paths alike):

- ``llama``, ``llama-tied``: Llama (SmolLM) with default RoPE, untied and tied embeddings;
- ``qwen2``: biases on q/k/v;
- ``llama3-rope``: Llama 3.x RoPE scaling (``rope_type: llama3``), its three frequency bands all in use;
- ``qwen3``: Qwen3, RMSNorm on each head of q and k, ``head_dim`` other than hidden / heads, tied embeddings;
- ``mistral-window``: Mistral with a ``sliding_window`` of 5, shorter than the sequences the tests run;
- ``qwen3-window``: Qwen3 with ``use_sliding_window``: the window in its second layer only.

``test_rope_scalings_match_transformers`` adds ``linear``, ``dynamic`` and ``yarn`` RoPE, and
``test_qwen2_sliding_window_matches_transformers`` Qwen2 with a window (prefill, ragged rollback, a draft tree).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from specfleet.config import ENGINE_DTYPES, EngineConfig
from specfleet.engine import (
    Extend,
    LlamaForCausalLM,
    ModelConfig,
    ModelRunner,
    SlotKVCache,
    TreeExtend,
    UnknownSequenceError,
)
from specfleet.engine.cpu_attention import (
    BIAS_KERNELS,
    FLASH_ONLY,
    AttentionKernels,
    Kernel,
    always,
    grouped_attention,
    head_attention,
    native_attention_available,
)
from specfleet.engine.rope import default_inverse_frequencies
from specfleet.engine.runner import DTYPES, engine_dtype
from specfleet.trees.build import build_tree_rsd_c
from specfleet.verify import verify_tree_greedy

TOLERANCE = 1e-4
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
WINDOW = 5  # shorter than every sequence below: tokens past the 5th see only part of it
# Llama 3.1's scaling shrunk to the tiny model: with head_dim 16 and theta 10000 the wavelengths run from 6 to
# 20000 positions, so some stay (< 64 / 4), two are blended, and the rest are stretched (> 64 / 1).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _save_tiny(folder: Path, config, random_norms: bool = False) -> Path:
    """A random model from ``config``; with ``random_norms`` its RMSNorm weights are random too (not all ones), so a
    norm loaded wrong or left out shows in the logits."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if random_norms:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


def _tiny_config(name: str):
    if name == "qwen2":
        return Qwen2Config(**TINY, rope_theta=10000.0)
    if name == "llama3-rope":
        return LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE)
    if name == "qwen3":
        return Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True)
    if name == "mistral-window":
        return MistralConfig(**TINY, sliding_window=WINDOW)
    if name == "qwen3-window":
        return Qwen3Config(**TINY, head_dim=32, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    return LlamaConfig(**TINY, rope_theta=50000.0, tie_word_embeddings=name == "llama-tied")


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama-tied", "llama3-rope", "qwen3", "mistral-window",
                                        "qwen3-window"])
def tiny_folder(request, tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp(request.param), _tiny_config(request.param),
                      random_norms=request.param not in ("llama", "qwen2", "llama-tied"))


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


def test_decoding_a_group_that_reads_many_kv_entries_matches_transformers(tiny_folder: Path) -> None:
    """20 sequences of 230 tokens decode one token each: a group reading 4600 KV entries, where one query per
    sequence attends with the matmuls when the timed choice says so (here it is told to, from 4096 entries)."""
    rows, length = 20, 230
    g = torch.Generator().manual_seed(2)
    seqs = {f"s{i}": torch.randint(0, 97, (length,), generator=g).tolist() for i in range(rows)}
    runner = ModelRunner.from_folder(tiny_folder, num_slots=rows, max_seq_len=length)
    runner.attention_kernels = AttentionKernels(((20, 230),), ((1, (Kernel.MATMULS,)),))
    runner.extend([Extend(name, 0, toks[:-1]) for name, toks in seqs.items()])
    outs = runner.extend([Extend(name, length - 1, toks[-1:]) for name, toks in seqs.items()])
    for toks, ours in list(zip(seqs.values(), outs, strict=True))[::7]:
        torch.testing.assert_close(ours, _reference_logits(tiny_folder, toks)[-1:], atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("kernel", [Kernel.MATMULS, Kernel.HEAD_MATMULS])
def test_a_forward_attends_with_the_kernel_its_model_chose(tiny_folder: Path, kernel: Kernel, monkeypatch) -> None:
    """A runner times the CPU's attention kernels for its slots; a forward then takes each exactly for the widths and
    sizes the choice gives it, with the logits the flash kernel gives."""
    widths: list[int] = []
    runner = ModelRunner.from_folder(tiny_folder, num_slots=1, max_seq_len=64)
    runner.extend([Extend("a", 0, [5, 17, 3, 88, 42, 9, 1, 60])])
    original = BIAS_KERNELS[kernel]
    monkeypatch.setitem(BIAS_KERNELS, kernel, lambda q, *rest: widths.append(q.shape[2]) or original(q, *rest))
    verify = Extend("a", 8, [7, 21, 2], num_logits=3)
    runner.attention_kernels = FLASH_ONLY
    [flash] = runner.extend([verify])
    assert widths == []
    # The group is one sequence reading 11 entries: nearest 1 x 10 of the timed groups.
    groups = ((1, 10), (1, 1000))
    runner.attention_kernels = AttentionKernels(groups, ((1, (kernel, kernel)), (3, (Kernel.FLASH, kernel))))
    [not_yet] = runner.extend([verify])
    assert widths == []
    flash_at_one = (1, (Kernel.FLASH, Kernel.FLASH))
    runner.attention_kernels = AttentionKernels(groups, (flash_at_one, (3, (kernel, Kernel.FLASH))))
    [chosen] = runner.extend([verify])
    assert widths == [3] * runner.model.cfg.num_layers
    torch.testing.assert_close(not_yet, flash)
    torch.testing.assert_close(chosen, flash, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.skipif(not native_attention_available(64, torch.float32), reason="no C compiler to build the kernel")
def test_a_forward_with_the_native_kernel_matches_transformers(tmp_path_factory) -> None:
    """Heads of 64 (a size cpu_attention.c serves), a ragged prefill (wider than any timed width: the flash kernel),
    then a ragged verify of 3 tokens and a decode step attended by the native kernel, with a filler row read."""
    folder = _save_tiny(tmp_path_factory.mktemp("qwen3-head64"), Qwen3Config(**TINY, head_dim=64), random_norms=True)
    g = torch.Generator().manual_seed(5)
    seqs = {name: torch.randint(0, 97, (n,), generator=g).tolist() for name, n in [("a", 40), ("b", 23), ("c", 31)]}
    runner = ModelRunner.from_folder(folder, num_slots=4, max_seq_len=64)
    runner.attention_kernels = always(Kernel.NATIVE)
    calls: list[int] = []
    original = BIAS_KERNELS[Kernel.NATIVE]
    runner.extend([Extend(name, 0, toks[:-4]) for name, toks in seqs.items()])
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(BIAS_KERNELS, Kernel.NATIVE, lambda q, *rest: calls.append(q.shape[2]) or original(q, *rest))
        verified = runner.extend([Extend(name, len(toks) - 4, toks[-4:-1], num_logits=3)
                                  for name, toks in list(seqs.items())[::2]])
        decoded = runner.extend([Extend(name, len(toks) - 1, toks[-1:]) for name, toks in list(seqs.items())[::2]])
    assert calls == [3] * runner.model.cfg.num_layers + [1] * runner.model.cfg.num_layers
    for (_, toks), three, one in zip(list(seqs.items())[::2], verified, decoded, strict=True):
        reference = _reference_logits(folder, toks)
        torch.testing.assert_close(three, reference[-4:-1], atol=TOLERANCE, rtol=TOLERANCE)
        torch.testing.assert_close(one, reference[-1:], atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("attention", [grouped_attention, head_attention])
@pytest.mark.parametrize("width", [1, 2, 5, 8])
def test_matmul_attention_equals_scaled_dot_product_attention(width: int, attention) -> None:
    """The matmul attentions the CPU may choose: GQA heads, a causal mask over ragged lengths, and a row that sees
    one key only (a filler row), all as PyTorch's kernel computes them; keys and values are views of longer slots."""
    g = torch.Generator().manual_seed(width)
    rows, heads, kv_heads, head_dim, kv_len = 4, 6, 2, 16, 11
    q = torch.randn(rows, heads, width, head_dim, generator=g)
    keys, values = (torch.randn(rows, kv_heads, kv_len + 5, head_dim, generator=g)[:, :, :kv_len] for _ in range(2))
    lengths = torch.tensor([kv_len, 7, 9, 1])  # the sequence's last query sits at lengths - 1
    positions = lengths[:, None] - width + torch.arange(width)
    mask = (torch.arange(kv_len)[None, None, :] <= positions.clamp(min=0)[:, :, None])[:, None]
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf")).unsqueeze(1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(attention(q, keys, values, bias), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hole", [False, True])
def test_a_ragged_batch_runs_in_one_pass_with_the_logits_of_separate_runs(tiny_folder: Path, hole: bool) -> None:
    """Decodes, draft chains and a prompt's prefill in one call: one pass over the weights (attention in
    groups of similar width), and each sequence's logits as if it had run alone. With a ``hole`` the batch's
    slots are out of order (the prompt takes a slot freed below the others), so groups read the cache both
    through views and through gathered copies."""
    g = torch.Generator().manual_seed(2)
    prompts = {f"s{i}": torch.randint(0, 97, (n,), generator=g).tolist() for i, n in enumerate([5, 7, 12, 6, 9])}
    news = {name: torch.randint(0, 97, (n,), generator=g).tolist() for name, n in zip(prompts, [1, 1, 9, 3, 1],
                                                                                        strict=True)}
    fresh = torch.randint(0, 97, (40,), generator=g).tolist()

    together = ModelRunner.from_folder(tiny_folder, num_slots=8, max_seq_len=64)
    if hole:
        together.extend([Extend("gone", 0, [1, 2, 3])])
    together.extend([Extend(name, 0, toks) for name, toks in prompts.items()])
    together.release(["gone"])
    passes = []
    hook = together.model.register_forward_hook(lambda *_: passes.append(1))
    outs = together.extend([*(Extend(name, len(prompts[name]), new, num_logits=len(new)) for name, new in news.items()),
                            Extend("fresh", 0, fresh, num_logits=3)])
    hook.remove()
    assert len(passes) == 1

    alone = ModelRunner.from_folder(tiny_folder, num_slots=8, max_seq_len=64)
    for name, toks in prompts.items():
        alone.extend([Extend(name, 0, toks)])
    expected = [alone.extend([Extend(name, len(prompts[name]), new, num_logits=len(new))])[0]
                for name, new in news.items()]
    expected.append(alone.extend([Extend("fresh", 0, fresh, num_logits=3)])[0])
    for ours, reference in zip(outs, expected, strict=True):
        torch.testing.assert_close(ours, reference, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("kept", [[0, 11], [2, 3, 5, 9], [0, 1, 2, 3]])
def test_a_batch_in_any_slots_has_the_logits_of_separate_runs(tiny_folder: Path, kept: list[int]) -> None:
    """Attention reads a batch's slots through one view (filler rows between them) or, spread wide, gathers
    them; either way each sequence's logits are its own."""
    g = torch.Generator().manual_seed(3)
    prompts = {f"s{i}": torch.randint(0, 97, (4 + i % 5,), generator=g).tolist() for i in range(12)}
    runner = ModelRunner.from_folder(tiny_folder, num_slots=16, max_seq_len=32)
    runner.extend([Extend(name, 0, toks) for name, toks in prompts.items()])  # s{i} in slot i
    runner.release([f"s{i}" for i in range(12) if i not in kept])
    news = {f"s{i}": torch.randint(0, 97, (1 + i % 3,), generator=g).tolist() for i in kept}
    outs = runner.extend([Extend(name, len(prompts[name]), new, num_logits=len(new)) for name, new in news.items()])
    for (name, new), ours in zip(news.items(), outs, strict=True):
        alone = ModelRunner.from_folder(tiny_folder, num_slots=1, max_seq_len=32)
        reference = alone.extend([Extend(name, 0, prompts[name] + new, num_logits=len(new))])[0]
        torch.testing.assert_close(ours, reference, atol=TOLERANCE, rtol=TOLERANCE)


def test_warm_up_leaves_the_cache_as_it_found_it(tiny_folder: Path) -> None:
    tokens = [5, 17, 3, 88, 42, 9, 1, 60]
    runner = ModelRunner.from_folder(tiny_folder, num_slots=2, max_seq_len=64)
    runner.warm_up()
    assert runner.live_sequences == 0 and runner.cache.num_free == 2
    [ours] = runner.extend([Extend("a", 0, tokens, num_logits=len(tokens))])
    torch.testing.assert_close(ours, _reference_logits(tiny_folder, tokens), atol=TOLERANCE, rtol=TOLERANCE)


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


def test_the_lowest_free_slot_goes_first() -> None:
    """Live sequences stay packed at the front of the cache, where a batch's slots tend to form one run."""
    cache = SlotKVCache(num_layers=1, num_slots=4, max_seq_len=8, num_kv_heads=1, head_dim=2)
    assert [cache.allocate() for _ in range(4)] == [0, 1, 2, 3]
    cache.free(2)
    cache.free(0)
    assert cache.allocate() == 0 and cache.allocate() == 2


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


def test_compact_moves_kept_entries_into_place() -> None:
    cache = SlotKVCache(num_layers=2, num_slots=2, max_seq_len=8, num_kv_heads=1, head_dim=2)
    slot = cache.allocate()
    for layer in range(2):
        cache.keys[layer][slot, 0, :, 0] = torch.arange(8.0) + 10 * layer
        cache.values[layer][slot, 0, :, 1] = -torch.arange(8.0)
    cache.lengths[slot] = 7
    cache.compact(slot, 2, [1, 3, 4])  # entries 3, 5, 6 move to 2, 3, 4
    assert cache.lengths[slot] == 5
    assert cache.keys[1][slot, 0, :5, 0].tolist() == [10, 11, 13, 15, 16]
    assert cache.values[0][slot, 0, :5, 1].tolist() == [0, -1, -3, -5, -6]
    with pytest.raises(ValueError, match="offsets"):
        cache.compact(slot, 2, [2, 1])
    with pytest.raises(ValueError, match="offsets"):
        cache.compact(slot, 2, [3])  # beyond the length
    cache.compact(slot, 2, [])  # keeping nothing is a truncate
    assert cache.lengths[slot] == 2


# Tree used below (node: token):  root ─┬─ 0:11 ─┬─ 2:13 ── 5:16
#                                        │        └─ 3:14
#                                        └─ 1:12 ── 4:15
TREE_TOKENS = [11, 12, 13, 14, 15, 16]
TREE_PARENTS = [-1, -1, 0, 0, 1, 2]


def _path(node: int, parents: list[int] = TREE_PARENTS) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def _chain_logits(runner: ModelRunner, tokens: list[int]) -> torch.Tensor:
    """Logits after ``tokens`` run as a plain chain in a scratch sequence."""
    [out] = runner.extend([Extend("chain-reference", 0, tokens)])
    runner.release(["chain-reference"])
    return out[0]


def test_tree_logits_equal_each_path_run_as_a_chain(tiny_folder: Path) -> None:
    runner = ModelRunner.from_folder(tiny_folder, num_slots=4, max_seq_len=64)
    prompts = {"a": [5, 17, 3, 88, 42, 9, 1], "b": [60, 2, 71]}
    trees = {"a": (TREE_TOKENS, TREE_PARENTS), "b": ([30, 31, 32], [-1, 0, -1])}
    runner.extend([Extend(name, 0, toks[:-2]) for name, toks in prompts.items()])
    # Ragged: "a" brings two committed tokens with its tree, "b" one (after rolling one back).
    outs = runner.extend_tree([
        TreeExtend("a", len(prompts["a"]) - 2, prompts["a"][-2:], *trees["a"]),
        TreeExtend("b", len(prompts["b"]) - 2, prompts["b"][-2:-1], *trees["b"]),
    ])
    prompts["b"] = prompts["b"][:-1]
    for (name, prompt), out in zip(prompts.items(), outs, strict=True):
        tokens, parents = trees[name]
        assert out.shape == (1 + len(tokens), runner.vocab_size)
        torch.testing.assert_close(out[0], _chain_logits(runner, prompt), atol=TOLERANCE, rtol=TOLERANCE)
        for node in range(len(tokens)):
            path_tokens = [tokens[j] for j in _path(node, parents)]
            torch.testing.assert_close(out[node + 1], _chain_logits(runner, prompt + path_tokens),
                                       atol=TOLERANCE, rtol=TOLERANCE)
        assert runner.cached_len(name) == len(prompt) + len(tokens)


def test_a_tree_deeper_than_the_window_equals_its_paths_as_chains(tiny_folder: Path) -> None:
    """A sliding window measures positions: node 9 (depth 6) sits at position prefix + 6, its ancestor node 3 at
    position prefix + 0 but cache entry prefix + 3, so with WINDOW = 5 node 9 must not see node 3, as it would if a
    key's entry were taken for its position."""
    parents = [-1, -1, -1, -1, 3, 4, 5, 6, 7, 8]
    tokens = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    prompt = [5, 17, 3, 88]
    runner = ModelRunner.from_folder(tiny_folder, num_slots=2, max_seq_len=32)
    [out] = runner.extend_tree([TreeExtend("s", 0, prompt, tokens, parents)])
    for node in range(len(tokens)):
        path_tokens = [tokens[j] for j in _path(node, parents)]
        torch.testing.assert_close(out[node + 1], _chain_logits(runner, prompt + path_tokens), atol=TOLERANCE,
                                   rtol=TOLERANCE)


def test_chain_shaped_tree_equals_extend(tiny_folder: Path) -> None:
    runner = ModelRunner.from_folder(tiny_folder, num_slots=2, max_seq_len=32)
    [tree] = runner.extend_tree([TreeExtend("t", 0, [4, 5, 6], [7, 8, 9], [-1, 0, 1])])
    [chain] = runner.extend([Extend("c", 0, [4, 5, 6, 7, 8, 9], num_logits=4)])
    torch.testing.assert_close(tree, chain, atol=TOLERANCE, rtol=TOLERANCE)


def test_keep_path_continues_as_if_the_path_were_a_chain(tiny_folder: Path) -> None:
    runner = ModelRunner.from_folder(tiny_folder, num_slots=3, max_seq_len=64)
    prompt = [5, 17, 3, 88, 42]
    runner.extend_tree([TreeExtend("s", 0, prompt, TREE_TOKENS, TREE_PARENTS)])
    runner.keep_path("s", len(prompt), [0, 2, 5])  # tokens 11, 13, 16
    committed = prompt + [11, 13, 16]
    assert runner.cached_len("s") == len(committed)
    # The kept keys/values are the ones a chain would have written.
    runner.extend([Extend("chain", 0, committed)])
    slot, chain_slot = runner._slots["s"], runner._slots["chain"]
    for keys in runner.cache.keys:
        torch.testing.assert_close(keys[slot, :, : len(committed)], keys[chain_slot, :, : len(committed)],
                                   atol=TOLERANCE, rtol=TOLERANCE)
    runner.release(["chain"])
    # Next step: the bonus token and a new tree after the kept path, then keep a path through node 1.
    outs = runner.extend_tree([TreeExtend("s", len(committed), [20], [21, 22], [-1, -1])])[0]
    committed.append(20)
    torch.testing.assert_close(outs[0], _chain_logits(runner, committed), atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(outs[2], _chain_logits(runner, committed + [22]), atol=TOLERANCE, rtol=TOLERANCE)
    runner.keep_path("s", len(committed), [1])
    [after] = runner.extend([Extend("s", len(committed) + 1, [23])])
    torch.testing.assert_close(after[0], _chain_logits(runner, committed + [22, 23]), atol=TOLERANCE,
                               rtol=TOLERANCE)


def test_tree_state_guards(tiny_folder: Path) -> None:
    runner = ModelRunner.from_folder(tiny_folder, num_slots=2, max_seq_len=32)
    runner.extend_tree([TreeExtend("s", 0, [1, 2, 3], TREE_TOKENS, TREE_PARENTS)])
    with pytest.raises(ValueError, match="draft tree"):
        runner.extend([Extend("s", 5, [9])])  # inside the tree: not a sequence
    with pytest.raises(ValueError, match="not a path"):
        runner.keep_path("s", 3, [0, 4])  # node 4 is a child of node 1
    with pytest.raises(ValueError, match="no draft tree"):
        runner.keep_path("s", 2, [0])
    with pytest.raises(ValueError, match="tree_parents"):
        runner.extend_tree([TreeExtend("x", 0, [1], [5, 6], [-1, 1])])
    runner.extend([Extend("s", 3, [9])])  # rolling back to the prefix drops the tree
    assert runner.cached_len("s") == 4
    with pytest.raises(ValueError, match="no draft tree"):
        runner.keep_path("s", 3, [])


def test_tree_steps_reproduce_target_greedy_decoding(tiny_folder: Path) -> None:
    """Draft trees (RSD-C from the same model at temperature 0.02) verified greedily with tree attention,
    keeping the accepted path each step, emit exactly the target's greedy continuation."""
    runner = ModelRunner.from_folder(tiny_folder, num_slots=3, max_seq_len=64)
    prompt, length = [5, 17, 3, 88], 8
    reference = list(prompt)
    for _ in range(length):
        reference.append(int(_chain_logits(runner, reference).argmax()))

    committed, new_tokens, rollback_to, accepted = list(prompt), list(prompt), 0, 0

    def draft_logprobs(rows: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.log_softmax(_chain_logits(runner, committed + path) / 0.02, -1)
                            for path in paths.tolist()])

    generator = torch.Generator().manual_seed(0)
    while len(committed) < len(prompt) + length:
        tree = build_tree_rsd_c(draft_logprobs, 1, [2, 2], generator)
        [logits] = runner.extend_tree([TreeExtend("s", rollback_to, new_tokens, tree.tokens[0].tolist(),
                                                  tree.parents[0].tolist())])
        result = verify_tree_greedy(logits[None], tree)
        runner.keep_path("s", len(committed), result.accepted_path(0))
        accepted += int(result.accepted_counts[0])
        rollback_to = len(committed) + int(result.accepted_counts[0])
        new_tokens = result.emitted(0)[-1:]  # the recovered or bonus token is not in the cache yet
        committed += result.emitted(0)
    assert committed[: len(reference)] == reference
    assert accepted > 0  # kept paths were exercised


def test_loads_real_tied_checkpoint_names(tiny_folder: Path) -> None:
    model = LlamaForCausalLM.from_folder(tiny_folder)
    if model.cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# RoPE scalings beyond llama3, on the two tests that compare with transformers directly.
OTHER_ROPES = {
    "linear": LlamaConfig(**TINY, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "dynamic": LlamaConfig(**TINY, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}),
    "yarn": Qwen3Config(**TINY, head_dim=32, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                              "factor": 4.0, "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("rope_type", list(OTHER_ROPES))
def test_rope_scalings_match_transformers(rope_type: str, tmp_path: Path) -> None:
    """``dynamic`` changes its frequencies only past max_position_embeddings, where the runner never goes (it caps
    ``max_seq_len`` there), so it runs as the default RoPE and matches transformers at every length the engine
    holds."""
    folder = _save_tiny(tmp_path, OTHER_ROPES[rope_type], random_norms=True)
    test_prefill_matches_transformers(folder)
    test_ragged_batch_truncate_and_extend_match_transformers(folder)
    test_tree_logits_equal_each_path_run_as_a_chain(folder)


def test_qwen2_sliding_window_matches_transformers(tmp_path: Path) -> None:
    """Qwen2 reads ``use_sliding_window`` and ``max_window_layers`` as Qwen3 does: here the window is in its second
    layer only."""
    folder = _save_tiny(tmp_path, Qwen2Config(**TINY, use_sliding_window=True, sliding_window=WINDOW,
                                              max_window_layers=1), random_norms=True)
    assert ModelConfig.from_dict(json.loads((folder / "config.json").read_text())).window_layers == (1,)
    test_prefill_matches_transformers(folder)
    test_ragged_batch_truncate_and_extend_match_transformers(folder)
    test_a_tree_deeper_than_the_window_equals_its_paths_as_chains(folder)


@pytest.mark.parametrize("name", ["llama", "llama3-rope", "qwen3", *OTHER_ROPES])
def test_rope_frequencies_equal_transformers(name: str) -> None:
    """The inverse frequencies and cos/sin scale read from a config are the ones the transformers model computes,
    bit for bit; every scaling but ``dynamic`` changes them."""
    config = OTHER_ROPES.get(name) or _tiny_config(name)
    rotary = AutoModelForCausalLM.from_config(config).model.rotary_emb
    cfg = ModelConfig.from_dict(config.to_dict())
    inv_freq, scaling = cfg.rope_scaling.frequencies(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
    assert torch.equal(inv_freq, rotary.inv_freq) and scaling == rotary.attention_scaling
    scaled = cfg.rope_scaling.rope_type not in ("default", "dynamic")
    assert scaled == (not torch.equal(inv_freq, default_inverse_frequencies(cfg.head_dim, cfg.rope_theta)))


def test_llama3_rope_uses_all_three_bands() -> None:
    """The llama3 fixture keeps the fastest frequency, blends two and stretches the rest by ``factor``."""
    cfg = ModelConfig.from_dict(_tiny_config("llama3-rope").to_dict())
    inv_freq, _ = cfg.rope_scaling.frequencies(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
    ratio = (default_inverse_frequencies(cfg.head_dim, cfg.rope_theta) / inv_freq).tolist()
    assert ratio[0] == 1.0 and all(1.0 < r < 8.0 for r in ratio[1:3]) and ratio[3:] == pytest.approx([8.0] * 5)


def test_sliding_window_hides_keys_beyond_it(tmp_path: Path) -> None:
    """Mistral's window changes the logits exactly where a token has more than ``WINDOW`` positions behind it:
    the same weights without a window agree up to there and differ after."""
    windowed = _save_tiny(tmp_path / "windowed", _tiny_config("mistral-window"), random_norms=True)
    unwindowed = _save_tiny(tmp_path / "unwindowed", MistralConfig(**TINY, sliding_window=None), random_norms=True)
    tokens = [5, 17, 3, 88, 42, 9, 1, 60, 33, 12]
    [ours] = ModelRunner.from_folder(windowed, num_slots=1, max_seq_len=64).extend(
        [Extend("a", 0, tokens, num_logits=len(tokens))])
    [full] = ModelRunner.from_folder(unwindowed, num_slots=1, max_seq_len=64).extend(
        [Extend("a", 0, tokens, num_logits=len(tokens))])
    torch.testing.assert_close(ours[:WINDOW], full[:WINDOW], atol=TOLERANCE, rtol=TOLERANCE)
    assert all((ours[i] - full[i]).abs().max() > 1e-3 for i in range(WINDOW, len(tokens)))


def test_which_layers_use_a_window() -> None:
    """As transformers reads the config: Mistral windows every layer when ``sliding_window`` is set; Qwen2 and
    Qwen3 only with ``use_sliding_window`` and from ``max_window_layers`` on (or as ``layer_types`` says); Llama
    never."""
    def window(**raw):
        cfg = ModelConfig.from_dict({**TINY, "num_hidden_layers": 4, **raw})
        return cfg.sliding_window, cfg.window_layers

    assert window(model_type="mistral", sliding_window=8) == (8, (0, 1, 2, 3))
    assert window(model_type="mistral", sliding_window=None) == (None, ())
    assert window(model_type="qwen2", sliding_window=8) == (None, ())  # use_sliding_window is off by default
    assert window(model_type="qwen2", sliding_window=8, use_sliding_window=True, max_window_layers=2) == (8, (2, 3))
    assert window(model_type="qwen3", sliding_window=8, use_sliding_window=True,
                  layer_types=["sliding_attention", "full_attention"] * 2) == (8, (0, 2))
    assert window(model_type="qwen3", sliding_window=8, use_sliding_window=True, max_window_layers=4) == (None, ())
    assert window(model_type="llama", sliding_window=8) == (None, ())


def test_an_unsupported_architecture_names_itself_and_the_supported_ones(tmp_path: Path) -> None:
    from transformers import GPT2Config

    folder = _save_tiny(tmp_path, GPT2Config(vocab_size=97, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ValueError) as info:
        ModelRunner.from_folder(folder, num_slots=1, max_seq_len=32)
    message = str(info.value)
    assert str(folder) in message and "'gpt2'" in message and "GPT2LMHeadModel" in message
    assert "supported model types: llama, mistral, qwen2, qwen3" in message


@pytest.mark.parametrize("raw, complaint", [
    ({"model_type": "llama", "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     "unsupported RoPE type 'longrope'; supported: default, linear, dynamic, llama3, yarn"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     "needs low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"model_type": "llama", "mlp_bias": True}, "unsupported mlp_bias"),
    ({"model_type": "qwen2", "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "unsupported partial_rotary_factor"),
])
def test_what_the_forward_lacks_is_refused_by_name(raw: dict, complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        ModelConfig.from_dict({**TINY, "num_hidden_layers": 2, **raw})


# --dtype: bfloat16 and float16 against transformers run in the same dtype. Both forwards round every activation to
# 8 (bfloat16) or 11 (float16) significant bits, in a different order of operations, so the tiny models' logits
# (about 0.5 in size, where a bfloat16 step is 1/256) agree to a few such steps, not to TOLERANCE; greedy decoding
# on a short prompt still picks the same tokens.
HALF_TOLERANCE = {"bfloat16": 1e-2, "float16": 2e-3}


@pytest.mark.parametrize("name, dtype", [("llama", "bfloat16"), ("qwen3-window", "bfloat16"), ("llama", "float16")])
def test_half_precision_matches_transformers_in_that_dtype(name: str, dtype: str, tmp_path: Path) -> None:
    folder = _save_tiny(tmp_path, _tiny_config(name), random_norms=name != "llama")
    torch_dtype = getattr(torch, dtype)
    runner = ModelRunner.from_folder(folder, num_slots=1, max_seq_len=64, dtype=dtype)
    assert runner.model.lm_head.weight.dtype == torch_dtype and runner.cache.keys[0].dtype == torch_dtype
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval()
    prompt = [5, 17, 3, 88, 42, 9, 1, 60]
    [ours] = runner.extend([Extend("a", 0, prompt, num_logits=len(prompt))])
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0].float()
        greedy: list[int] = []
        for _ in range(8):
            greedy.append(int(reference(torch.tensor([prompt + greedy])).logits[0, -1].argmax()))
    torch.testing.assert_close(ours, expected, atol=HALF_TOLERANCE[dtype], rtol=HALF_TOLERANCE[dtype])
    tokens = [int(ours[-1].argmax())]
    while len(tokens) < len(greedy):
        [logits] = runner.extend([Extend("a", len(prompt) + len(tokens) - 1, tokens[-1:])])
        tokens.append(int(logits[-1].argmax()))
    assert tokens == greedy


def test_dtype_names() -> None:
    """``auto`` keeps what the engine always did: bfloat16 on CUDA, float32 elsewhere; the CLI offers every name."""
    assert engine_dtype("auto", "cpu") == torch.float32
    assert engine_dtype("auto", "cuda:1") == torch.bfloat16
    assert engine_dtype("float16", "cpu") == torch.float16 and engine_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        engine_dtype("int8", "cpu")
    assert ("auto", *DTYPES) == ENGINE_DTYPES
    assert EngineConfig(dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"--dtype must be one of auto, float32, bfloat16, float16, got 'half'"):
        EngineConfig(dtype="half")
