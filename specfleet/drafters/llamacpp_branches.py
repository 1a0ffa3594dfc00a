"""A draft tree's paths on llama.cpp slots: the logits after each path of draft tokens below a sequence's committed
tokens, for the tree builders' ``draft_logprobs``.

llama.cpp attends along one sequence at a time, so two branches of a tree cannot share a slot. A row's own slot
follows one path; a path that leaves it goes to a scratch slot that first receives a copy of the slot it branches
from (`LlamaCppRunner.copy_slot`), rolled back to where the two paths part. Every path asked for is decoded once
(its logits are remembered), a path that extends the one a slot holds just appends to it, and all the tokens of one
call go through one llama.cpp decode.
"""

from __future__ import annotations

import torch

from specfleet.llamacpp import Entry, LlamaCppRunner
from specfleet.token_paths import common_prefix_length

TokenPath = tuple[int, ...]


class BranchSlots:
    """The logits after any path below each row's committed tokens, for rows whose own slots hold those tokens (and
    nothing after them) and whose logits there are ``roots``; ``scratch`` are the slots branches may be copied into.
    `finish` leaves each row's slot holding its committed tokens again and empties the scratch slots."""

    def __init__(self, runner: LlamaCppRunner, slots: list[int], committed: list[int], roots: torch.Tensor,
                 scratch: list[int]) -> None:
        self.runner = runner
        self.committed = committed
        self.own = slots
        self.holds: list[dict[int, TokenPath]] = [{slot: ()} for slot in slots]  # per row: slot -> the path it holds
        self.known: list[dict[TokenPath, torch.Tensor]] = [{(): roots[row]} for row in range(len(slots))]
        self.free = list(scratch)
        self.scratch = list(scratch)

    def logits(self, rows: list[int], paths: list[TokenPath]) -> torch.Tensor:  # [len(rows), vocab]
        """The draft's logits after each (row, path)."""
        wanted = list(dict.fromkeys((row, path) for row, path in zip(rows, paths, strict=True)
                                    if path not in self.known[row]))
        if wanted:
            self._free_unneeded(wanted)
            entries = self._place(wanted)
            decoded = self.runner.decode(entries).clone()
            for (row, path), logits in zip(wanted, decoded, strict=True):
                self.known[row][path] = logits
        return torch.stack([self.known[row][path] for row, path in zip(rows, paths, strict=True)])

    def finish(self) -> None:
        for row, slot in enumerate(self.own):
            self.runner.roll_back(slot, self.committed[row])
        for slot in self.scratch:
            self.runner.clear_slot(slot)

    def _free_unneeded(self, wanted: list[tuple[int, TokenPath]]) -> None:
        """Gives back the scratch slots whose paths lead to none of this call's: the builders ask level by level,
        each level extending the last, so those paths are done."""
        for row, holds in enumerate(self.holds):
            paths = [path for r, path in wanted if r == row]
            for slot, held in list(holds.items()):
                if slot != self.own[row] and not any(path[:len(held)] == held for path in paths):
                    del holds[slot]
                    self.runner.clear_slot(slot)
                    self.free.append(slot)

    def _place(self, wanted: list[tuple[int, TokenPath]]) -> list[Entry]:
        """Puts each wanted path on a slot, the tokens it still needs as one decode's entries (each path's logits
        wanted at its last token, in the order of ``wanted``). A path extends the slot that holds the longest start
        of it unless another path of this call took that slot; otherwise it gets a scratch slot holding a copy of
        the slot that shares most of it, rolled back to where they part. Copies are taken from what slots held
        before this call: llama.cpp makes them before it decodes this call's tokens."""
        before = [dict(holds) for holds in self.holds]
        taken: set[int] = set()
        entries: list[Entry] = []
        for row, path in wanted:
            extendable = [(len(held), slot) for slot, held in before[row].items()
                          if slot not in taken and path[:len(held)] == held]
            if extendable:
                start, slot = max(extendable)
            else:
                start, source = max((common_prefix_length(held, path), slot) for slot, held in before[row].items())
                if not self.free:
                    raise RuntimeError("a draft tree needs more branches than the drafter's scratch slots hold")
                slot = self.free.pop()
                self.runner.copy_slot(source, slot, self.committed[row] + start)
            taken.add(slot)
            self.holds[row][slot] = path
            base = self.committed[row]
            entries += [(slot, base + i, path[i], i == len(path) - 1) for i in range(start, len(path))]
        return entries
