"""A KV cache that does not fit is refused at start, with what it needs; one that fits is allocated."""

from __future__ import annotations

import pytest
import torch

from specfleet.engine import memory
from specfleet.engine.kv_cache import SlotKVCache
from specfleet.engine.memory import GIB, InsufficientMemoryError, kv_cache_bytes

# SmolLM2-135M's attention: 30 layers, 3 KV heads of 64 dimensions.
SMOLLM2 = dict(num_layers=30, num_kv_heads=3, head_dim=64)


def test_bytes_count_keys_and_values_of_every_layer_slot_and_token() -> None:
    per_token = 2 * 30 * 3 * 64 * 4
    assert kv_cache_bytes(**SMOLLM2, num_slots=16, max_seq_len=8192, dtype=torch.float32) == per_token * 16 * 8192
    assert kv_cache_bytes(**SMOLLM2, num_slots=16, max_seq_len=8192, dtype=torch.bfloat16) == per_token * 16 * 8192 // 2


def test_a_cache_larger_than_the_memory_left_is_refused_with_the_size_it_needs(monkeypatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * GIB)
    needed = kv_cache_bytes(**SMOLLM2, num_slots=16, max_seq_len=8192, dtype=torch.float32)
    with pytest.raises(InsufficientMemoryError) as err:
        SlotKVCache(**SMOLLM2, num_slots=16, max_seq_len=8192)
    message = str(err.value)
    assert f"{needed / GIB:.2f} GiB" in message and "2.00 GiB is available" in message
    assert "16 slots x 8192 tokens" in message and "--num-slots" in message and "--max-seq-len" in message


def test_a_cache_that_fits_is_allocated(monkeypatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * GIB)
    cache = SlotKVCache(**SMOLLM2, num_slots=2, max_seq_len=64)
    assert cache.keys[0].shape == (2, 3, 64, 64)


def test_unknown_memory_does_not_block_a_start(monkeypatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    assert SlotKVCache(**SMOLLM2, num_slots=1, max_seq_len=8).num_slots == 1


def test_this_machine_reports_its_memory() -> None:
    available = memory.available_bytes(torch.device("cpu"))
    assert available is not None and available > 0
