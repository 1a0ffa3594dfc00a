"""A StreamingLLM cache for self-speculation over long contexts (MagicDec): the target's own weights, each
token attending only to the first few *sink* tokens and a window of the most recent ones.

Decoding a long context is bound by reading its KV cache. A draft that reads a small, fixed cache stays cheap
however long the context grows, so drafting with the target's own weights over such a cache pays where a
separate small model would not (Sadhukhan et al., "MagicDec", 2024; Xiao et al., "StreamingLLM", 2023).

The rule, which chunked prefill and drafting follow alike: the token at position p attends to the keys at
positions < ``sinks`` and at positions in (p - ``window``, p]. Every pass applies it as a mask, so how the
context is cut into chunks changes nothing (tests compare the cache with one masked pass over the whole
context).

Positions are the tokens' own (RoPE rotates every key at its place in the sequence), not their places in the
cache as in StreamingLLM, which re-rotates keys so that a model can run past its trained length. The engine
never runs a sequence past the model's ``max_position_embeddings``, so true positions are in range, and with
them the draft is exactly the target with the keys outside sinks and window masked out.

Storage per sequence is ``sinks + window + reach + chunk`` entries: the sinks, then the window's keys in order,
then what was written since the window was last trimmed (drafts not yet verified, the committed tokens of the
last few calls). When a write would overflow it, the window is trimmed in one move (the oldest keys that no
rollback within ``reach`` tokens can need again are dropped and the rest shifted down), so the copy is paid
about once per ``chunk`` tokens, not once per token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from specfleet.engine.llama import BatchLayout, LlamaForCausalLM
from specfleet.engine.runner import Extend, ModelRunner, TreeExtend, UnknownSequenceError, _Group, load_model


@dataclass(frozen=True)
class StreamingWindow:
    """Which keys a token sees (the first ``sinks`` tokens and the last ``window`` positions), and the room kept
    beyond them: ``reach`` entries so that a rollback of that many tokens behind the last write stays possible
    after a trim, and ``chunk`` entries for one pass's writes (a chunk of a prefill, drafts, a draft tree)."""

    sinks: int = 16
    window: int = 240
    reach: int = 48
    chunk: int = 80

    def __post_init__(self) -> None:
        if self.sinks < 0 or self.window < 1 or self.reach < 0 or self.chunk < 1:
            raise ValueError(f"need sinks >= 0, window >= 1, reach >= 0 and chunk >= 1, got {self}")

    @property
    def capacity(self) -> int:
        """Cache entries per sequence."""
        return self.sinks + self.window + self.reach + self.chunk


def streaming_layout(layout: BatchLayout, evicted: list[int], window: StreamingWindow) -> BatchLayout:
    """``layout`` (built on cache entries, as ``causal_layout`` and ``tree_layout`` build it) for sequences whose
    window lost its first ``evicted[row]`` positions: new tokens move to their true positions, keep their
    entries, and see only the sinks and the window before them."""
    device = layout.positions.device
    shift = torch.tensor(evicted, device=device)[:, None]
    entries = layout.write_index
    positions = torch.where(layout.valid, layout.positions + shift, layout.positions)
    entry = torch.arange(layout.kv_len, device=device).expand(len(evicted), -1)
    key_positions = torch.where(entry < window.sinks, entry, entry + shift)
    rows, cols = layout.packed
    key_positions[rows, entries[rows, cols]] = positions[rows, cols]  # tree nodes sit past their positions
    keys, queries = key_positions[:, None, :], positions[:, :, None]
    seen = (keys < window.sinks) | (keys > queries - window.window)  # [batch, tokens, kv_len]
    return replace(layout, positions=positions, cache_index=entries, attn_mask=layout.attn_mask & seen[:, None])


class StreamingRunner(ModelRunner):
    """A ``ModelRunner`` whose sequences keep a StreamingLLM cache: any length up to the model's context,
    ``window.capacity`` cache entries each. Lengths and rollback points are in tokens of the sequence, as for
    ``ModelRunner``; a rollback to before what the trimmed window can restore answers as an unknown sequence."""

    def __init__(self, model: LlamaForCausalLM, *, num_slots: int, window: StreamingWindow,
                 max_seq_len: int | None = None, max_batch_tokens: int = 2048, prefix_reuse: bool = True) -> None:
        if model.cfg.sliding_window is not None:
            raise ValueError(f"a {model.cfg.model_type} model with its own sliding window cannot draft over a "
                             "streaming cache: both would decide which keys a token sees")
        super().__init__(model, num_slots=num_slots, max_seq_len=window.capacity, max_batch_tokens=max_batch_tokens,
                         prefix_reuse=prefix_reuse)
        self.window = window
        self.context_limit = min(max_seq_len or model.cfg.max_position_embeddings, model.cfg.max_position_embeddings)
        self._evicted = [0] * num_slots  # per slot: window positions dropped, so entry = position - evicted

    @classmethod
    def from_folder(cls, folder: Path, *, num_slots: int, max_seq_len: int, device: str = "cpu",
                    dtype: torch.dtype | str = "auto", prepack: bool = True,
                    window: StreamingWindow = StreamingWindow(), prefix_reuse: bool = True) -> StreamingRunner:
        """A streaming runner over the model in ``folder`` (see `load_model`), for contexts up to ``max_seq_len``."""
        return cls(load_model(folder, device=device, dtype=dtype, prepack=prepack), num_slots=num_slots,
                   window=window, max_seq_len=max_seq_len, prefix_reuse=prefix_reuse)

    @property
    def max_seq_len(self) -> int:
        return self.context_limit

    def held_entries(self, seq_id: str) -> int | None:
        """Cache entries ``seq_id`` holds now (at most ``window.capacity``); None if unknown."""
        slot = self._slots.get(seq_id)
        return None if slot is None else self.cache.lengths[slot]

    def _sequence_length(self, slot: int) -> int:
        return self.cache.lengths[slot] + self._evicted[slot]

    def _entry(self, slot: int, length: int) -> int:
        return length - self._evicted[slot]

    def can_extend(self, seq_id: str, rollback_to: int) -> bool:
        if not super().can_extend(seq_id, rollback_to):
            return False
        slot = self._slots.get(seq_id)
        return slot is None or rollback_to == 0 or self._restorable(slot, rollback_to)

    def _restorable(self, slot: int, length: int) -> bool:
        """A token at ``length`` sees positions from length - window + 1 on: they must still be held. So a
        sequence (or a prefix taken from it) continues only from its last ``window.reach`` tokens or so once its
        window has been trimmed; a chat's next turn, which continues from where the last one ended, is such."""
        evicted = self._evicted[slot]
        return not evicted or length - self.window.window + 1 >= self.window.sinks + evicted

    def _start_from_prefix(self, request: Extend | TreeExtend, slot: int, source: int, length: int
                           ) -> Extend | TreeExtend:
        self._evicted[slot] = self._evicted[source]  # the copied entries stand for the same positions
        return super()._start_from_prefix(request, slot, source, length)

    def _forget(self, slot: int) -> None:
        super()._forget(slot)
        self._evicted[slot] = 0

    @torch.inference_mode()
    def extend(self, requests: list[Extend]) -> list[torch.Tensor]:
        """As ``ModelRunner.extend``; a long extend (a prefill) runs as a chunked prefill of ``window.chunk`` tokens
        per sequence and pass, so the cache never holds more than its capacity."""
        chunk = self.window.chunk
        for r in requests:
            if r.num_logits > chunk:
                raise ValueError(f"{r.seq_id}: a streaming cache returns the logits of at most {chunk} tokens per call")
            if not self.can_extend(r.seq_id, r.rollback_to):
                raise UnknownSequenceError(r.seq_id)
            if r.rollback_to + len(r.tokens) > self.max_seq_len:
                raise ValueError(f"{r.seq_id}: {r.rollback_to + len(r.tokens)} tokens exceed the model's "
                                 f"{self.max_seq_len}-token context")
        if all(len(r.tokens) <= chunk for r in requests):
            return super().extend(requests)
        ids = {r.seq_id for r in requests}
        # Every sequence holds its slot before any chunk runs, so none is evicted midway; one sent whole starts from
        # the longest prefix of it a slot holds, and only the rest is chunked.
        requests = [self._claim(r, ids)[1] for r in requests]
        # Chunk boundaries count back from the end, so the last chunk is whole and holds every logit asked for.
        pieces = [_chunks(r, chunk) for r in requests]
        logits: list[torch.Tensor] = [torch.empty(0)] * len(requests)
        for step in range(max(len(p) for p in pieces)):
            live = [i for i, p in enumerate(pieces) if step < len(p)]
            outs = super().extend([pieces[i][step] for i in live])
            for i, out in zip(live, outs, strict=True):
                logits[i] = out
        return logits

    @torch.inference_mode()
    def extend_tree(self, requests: list[TreeExtend]) -> list[torch.Tensor]:
        chunk = self.window.chunk
        for r in requests:
            if len(r.tokens) + len(r.tree_tokens) > chunk:
                raise ValueError(f"{r.seq_id}: a streaming cache takes at most {chunk} committed tokens and tree "
                                 f"nodes per tree, got {len(r.tokens)} + {len(r.tree_tokens)}")
        return super().extend_tree(requests)

    def _roll_back(self, slot: int, rollback_to: int, new_tokens: int) -> None:
        """Rolls back, then trims the window if ``new_tokens`` would overflow the slot: the positions before
        rollback_to - window - reach go, the rest shift down to follow the sinks."""
        if rollback_to == 0:  # the sequence starts over
            self._evicted[slot] = 0
        window, evicted = self.window, self._evicted[slot]
        entries = rollback_to - evicted
        self.cache.truncate(slot, entries)
        if entries + new_tokens <= window.capacity:
            return
        keep_from = rollback_to - window.window - window.reach  # the first window position kept
        drop = keep_from - (window.sinks + evicted)
        self.cache.compact(slot, window.sinks, list(range(drop, entries - window.sinks)))
        self._evicted[slot] = evicted + drop

    def _chain_group(self, requests: list[Extend], slots: list[int]) -> _Group:
        return self._streaming(super()._chain_group(requests, slots))

    def _tree_group(self, requests: list[TreeExtend], slots: list[int]) -> _Group:
        return self._streaming(super()._tree_group(requests, slots))

    def _streaming(self, group: _Group) -> _Group:
        return replace(group, layout=streaming_layout(group.layout, [self._evicted[s] for s in group.slots],
                                                      self.window))


def _chunks(request: Extend, size: int) -> list[Extend]:
    """``request`` as consecutive extends of at most ``size`` tokens, the last one whole and returning the logits."""
    tokens, n = request.tokens, len(request.tokens)
    cuts = [0, *range(n % size or size, n, size), n] if n > size else [0, n]
    return [Extend(request.seq_id, request.rollback_to + start, tokens[start:end],
                   request.num_logits if end == n else 1) for start, end in zip(cuts, cuts[1:], strict=False)]
