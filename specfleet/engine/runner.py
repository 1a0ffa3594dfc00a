"""Sequences as sessions over the slot KV cache: the model executor both services share.

A caller names sequences by ``seq_id`` and sends, per call, only what is new: the length to roll
back to and the tokens to append. Slots are bounded; when none is free the least recently used
sequence that is not in the current batch is evicted (its owner will see it as unknown and resend).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from specfleet.engine.kv_cache import CacheFullError
from specfleet.engine.llama import LlamaForCausalLM, causal_layout

log = logging.getLogger(__name__)


class UnknownSequenceError(KeyError):
    """The runner holds no (or too little) state for a sequence; the caller must resend it whole."""


@dataclass(frozen=True)
class Extend:
    """Append ``tokens`` to ``seq_id`` after rolling it back to ``rollback_to`` tokens, and return
    the logits of its last ``num_logits`` tokens."""

    seq_id: str
    rollback_to: int
    tokens: list[int]
    num_logits: int = 1


class ModelRunner:
    """A ``LlamaForCausalLM`` plus its KV cache, addressed by sequence id."""

    def __init__(self, model: LlamaForCausalLM, *, num_slots: int, max_seq_len: int,
                 max_batch_tokens: int = 2048) -> None:
        self.model = model
        self.cache = model.new_cache(num_slots, max_seq_len)
        self.max_batch_tokens = max_batch_tokens
        self._slots: OrderedDict[str, int] = OrderedDict()  # seq_id -> slot, least recently used first

    @classmethod
    def from_folder(cls, folder: Path, *, num_slots: int, max_seq_len: int, device: str = "cpu",
                    dtype: torch.dtype | None = None) -> ModelRunner:
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = LlamaForCausalLM.from_folder(folder, dtype=dtype, device=device)
        max_seq_len = min(max_seq_len, model.cfg.max_position_embeddings)
        return cls(model, num_slots=num_slots, max_seq_len=max_seq_len)

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    @property
    def live_sequences(self) -> int:
        return len(self._slots)

    def cached_len(self, seq_id: str) -> int | None:
        slot = self._slots.get(seq_id)
        return None if slot is None else self.cache.lengths[slot]

    def can_extend(self, seq_id: str, rollback_to: int) -> bool:
        """Whether a call with this rollback point can be served without resending the sequence."""
        if rollback_to == 0:
            return True
        cached = self.cached_len(seq_id)
        return cached is not None and cached >= rollback_to

    def release(self, seq_ids: list[str]) -> int:
        released = 0
        for seq_id in seq_ids:
            slot = self._slots.pop(seq_id, None)
            if slot is not None:
                self.cache.free(slot)
                released += 1
        return released

    def truncate(self, seq_id: str, length: int) -> None:
        self.cache.truncate(self._slots[seq_id], length)

    @torch.inference_mode()
    def extend(self, requests: list[Extend]) -> list[torch.Tensor]:
        """Runs every request in as few forward passes as padding allows; returns per request its
        logits [num_logits, vocab] (float32). Raises UnknownSequenceError before touching anything
        if a request cannot be served, and ValueError if a sequence would outgrow the cache."""
        ids = [r.seq_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("a sequence may appear only once per extend call")
        for r in requests:
            if not self.can_extend(r.seq_id, r.rollback_to):
                raise UnknownSequenceError(r.seq_id)
            if not r.tokens or not 1 <= r.num_logits <= len(r.tokens):
                raise ValueError(f"{r.seq_id}: need >= 1 new token and 1 <= num_logits <= tokens")
            if r.rollback_to + len(r.tokens) > self.max_seq_len:
                raise ValueError(f"{r.seq_id}: {r.rollback_to + len(r.tokens)} tokens exceed the "
                                 f"cache's {self.max_seq_len}-token limit")
        slots = [self._acquire(r.seq_id, busy=set(ids)) for r in requests]
        for r, slot in zip(requests, slots, strict=True):
            self.cache.truncate(slot, r.rollback_to)

        logits: list[torch.Tensor] = [torch.empty(0)] * len(requests)
        for group in self._plan_groups(requests):
            outputs = self._forward([requests[i] for i in group], [slots[i] for i in group])
            for i, out in zip(group, outputs, strict=True):
                logits[i] = out
        return logits

    def _forward(self, requests: list[Extend], slots: list[int]) -> list[torch.Tensor]:
        device = self.model.lm_head.weight.device
        new_lens = [len(r.tokens) for r in requests]
        start_lens = [self.cache.lengths[s] for s in slots]
        layout = causal_layout(slots, start_lens, new_lens, device)
        input_ids = torch.zeros(len(requests), max(new_lens), dtype=torch.long)
        for row, r in enumerate(requests):
            input_ids[row, : len(r.tokens)] = torch.tensor(r.tokens)
        rows = [row for row, r in enumerate(requests) for _ in range(r.num_logits)]
        cols = [n - r.num_logits + j for r, n in zip(requests, new_lens, strict=True) for j in range(r.num_logits)]
        out = self.model(input_ids.to(device), layout, self.cache, torch.tensor(rows, device=device),
                         torch.tensor(cols, device=device))
        for slot, start, n in zip(slots, start_lens, new_lens, strict=True):
            self.cache.lengths[slot] = start + n
        return list(out.split([r.num_logits for r in requests]))

    def _plan_groups(self, requests: list[Extend]) -> list[list[int]]:
        """Groups requests of similar length so padding wastes at most about half the work."""
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].tokens))
        groups: list[list[int]] = []
        current: list[int] = []
        for i in order:
            candidate = current + [i]
            width = len(requests[i].tokens)  # sorted: the newest is the widest
            real = sum(len(requests[j].tokens) for j in candidate)
            if current and (width * len(candidate) > 2 * real or width * len(candidate) > self.max_batch_tokens):
                groups.append(current)
                candidate = [i]
            current = candidate
        if current:
            groups.append(current)
        return groups

    def _acquire(self, seq_id: str, busy: set[str]) -> int:
        slot = self._slots.get(seq_id)
        if slot is not None:
            self._slots.move_to_end(seq_id)
            return slot
        if self.cache.num_free == 0:
            victim = next((s for s in self._slots if s not in busy), None)
            if victim is None:
                raise CacheFullError(f"all {self.num_slots} slots hold sequences of this batch")
            log.info("evicting sequence %s (least recently used) to make room for %s", victim, seq_id)
            self.release([victim])
        slot = self.cache.allocate()
        self._slots[seq_id] = slot
        return slot
