"""A slot-based KV cache: a fixed number of sequence slots, each with its own length.

Keys and values are written by position, so rolling back rejected draft tokens is only a matter
of moving the slot's length counter (``truncate``): later writes overwrite the stale entries.
"""

from __future__ import annotations

import heapq

import torch

from specfleet.engine.memory import check_fits, kv_cache_bytes


class CacheFullError(RuntimeError):
    """No free slot is left."""


class SlotKVCache:
    """Preallocated keys/values for ``num_slots`` sequences of up to ``max_seq_len`` tokens.

    ``keys[layer]`` and ``values[layer]`` are ``[num_slots, num_kv_heads, max_seq_len, head_dim]``.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError(f"need num_slots >= 1 and max_seq_len >= 1, got {num_slots}, {max_seq_len}")
        needed = kv_cache_bytes(num_layers=num_layers, num_slots=num_slots, max_seq_len=max_seq_len,
                                num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
        check_fits(needed, torch.device(device), f"a KV cache of {num_slots} slots x {max_seq_len} tokens ({dtype})",
                   "ask for fewer slots or shorter sequences (--num-slots, --max-seq-len)")
        shape = (num_slots, num_kv_heads, max_seq_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.lengths = [0] * num_slots
        # The lowest free slot first, so live sequences stay packed at the front: a batch whose slots lie close
        # together reads the cache through a view instead of gathering a copy (see `BatchLayout.slot_span`).
        self._free = list(range(num_slots))  # a heap

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_free(self, slot: int) -> bool:
        return slot in self._free

    def allocate(self, slot: int | None = None) -> int:
        """A free slot of length 0: ``slot`` itself when given (it must be free), else the lowest."""
        if not self._free:
            raise CacheFullError(f"all {self.num_slots} KV cache slots are in use")
        if slot is None:
            slot = heapq.heappop(self._free)
        else:
            if not self.is_free(slot):
                raise ValueError(f"slot {slot} is not free")
            self._free.remove(slot)
            heapq.heapify(self._free)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self._check_slot(slot)
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def truncate(self, slot: int, length: int) -> None:
        """Rolls the slot back to its first ``length`` tokens."""
        self._check_slot(slot)
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}")
        self.lengths[slot] = length

    def copy_prefix(self, source: int, slot: int, length: int) -> None:
        """Gives ``slot`` the first ``length`` entries of ``source`` (free or not: a free slot's entries stay until
        it is written again) and sets its length to ``length``."""
        self._check_slot(source)
        self._check_slot(slot)
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"cannot copy {length} entries of a {self.max_seq_len}-entry slot")
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[slot, :, :length] = keys[source, :, :length]
            values[slot, :, :length] = values[source, :, :length]
        self.lengths[slot] = length

    def compact(self, slot: int, start: int, offsets: list[int]) -> None:
        """Keeps entry ``start + offsets[i]`` at ``start + i`` and sets the length to ``start + len(offsets)``.

        After a draft tree was verified, this moves the accepted path's keys/values (``offsets``:
        increasing node indices) into consecutive positions; the rest is dropped by the length, as in
        ``truncate``. Keys need no re-rotation: the i-th node of a path sits at position start + i.
        """
        self._check_slot(slot)
        end = self.lengths[slot]
        if not 0 <= start <= end:
            raise ValueError(f"cannot compact slot {slot} of length {end} from {start}")
        if any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)) or (
                offsets and not (offsets[0] >= 0 and start + offsets[-1] < end)):
            raise ValueError(f"offsets must increase within [0, {end - start}), got {offsets}")
        if offsets:
            source = torch.tensor(offsets, device=self.keys[0].device) + start
            target = torch.arange(start, start + len(offsets), device=self.keys[0].device)
            for keys, values in zip(self.keys, self.values, strict=True):
                keys[slot, :, target] = keys[slot, :, source]  # the gather copies before the write
                values[slot, :, target] = values[slot, :, source]
        self.lengths[slot] = start + len(offsets)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")
