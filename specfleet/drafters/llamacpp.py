"""A quantized GGUF model drafts on the CPU through llama.cpp (``llama-cpp-python``'s low-level API).

Where a ``model`` drafter runs a float copy of a small LM in torch, this one runs the GGUF as it is packaged, 4-bit
quantized, with llama.cpp's CPU kernels: a fraction of the float copy's memory, and on a 2-core CPU a depth-4 draft
of SmolLM2-135M in about a quarter of the time at batch 1, half at batch 4 (docs/engine.md). Quantization moves its
drafts a little away from the float model's, which costs some acceptance and never correctness: the target
verifies every draft token.

Sequences are sessions of a `specfleet.llamacpp.LlamaCppRunner` (one llama.cpp context, a slot of its KV cache
each, rolled back with ``llama_memory_seq_rm``), the runner the llamacpp target backend verifies with. As in
`ModelDrafter`, each call runs one batch for the new tokens of all its sequences, then one batch per further draft
position with one token per sequence still drafting. Draft trees (DuoDecoding's several sequences with distinct
first tokens, RSD's trees) grow one branch per slot: a branch that leaves a sequence's own slot continues on a scratch
slot holding a copy of its cache (`specfleet.drafters.llamacpp_branches`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from specfleet.drafters.base import DraftRequest, DraftResult
from specfleet.drafters.llamacpp_branches import BranchSlots
from specfleet.drafters.tree_drafting import build_tree, tree_logprobs, tree_result, tree_shapes
from specfleet.llamacpp import Entry, LlamaCppRunner
from specfleet.sampling import DRAFT_STREAM, sample_drafts, seeded_uniforms
from specfleet.sampling_params import SamplingParams
from specfleet.trees.shapes import TreeShape


class LlamaCppDrafter:
    """Drafts with a GGUF model in one llama.cpp context, each sequence a session on a slot of its KV cache."""

    kind = "llamacpp"

    def __init__(self, gguf: Path, *, num_slots: int = 32, max_seq_len: int = 2048, threads: int = 0,
                 top_k_pairs: int = 64, target_vocab_size: int | None = None, tree_slots: int = 8) -> None:
        """``threads``: llama.cpp's threads (see `LlamaCppRunner`); 0 takes every core this process may use.
        ``tree_slots``: scratch slots for the branches of draft trees (each a copy of a sequence's cache, of
        ``max_seq_len`` cells); a call's trees are built a few sequences at a time when they need more, and a tree
        wider than all of them is drafted as a chain. 0: trees are drafted as chains."""
        self.runner = LlamaCppRunner(gguf, num_slots=num_slots, max_seq_len=max_seq_len, threads=threads,
                                     scratch_slots=tree_slots)
        if target_vocab_size is not None and target_vocab_size != self.runner.vocab_size:
            self.runner.close()
            raise ValueError(
                f"draft model vocabulary ({self.runner.vocab_size} tokens) differs from the target's "
                f"({target_vocab_size}): a llamacpp drafter must share the target's tokenizer")
        self.num_pairs = top_k_pairs

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def num_slots(self) -> int:
        return self.runner.num_slots

    @property
    def max_seq_len(self) -> int:
        return self.runner.max_seq_len

    @property
    def threads(self) -> int:
        return self.runner.threads

    def close(self) -> None:
        """Frees the llama.cpp model, context and batch now (otherwise when the drafter is collected)."""
        self.runner.close()

    def warm_up(self, widths: tuple[int, ...] = (1, 2, 3, 5, 9, 17)) -> None:
        """Drafts one token after a prompt of each width on a scratch sequence, then frees it: the first decodes pay
        one-off costs (thread start, buffer set-up) that would otherwise land on the first requests and in the
        latency telemetry the depth policy fits."""
        scratch = "__warm_up__"
        for width in widths:
            if width < self.max_seq_len:
                self.propose([DraftRequest(scratch, 0, [0] * width, 1, SamplingParams())])
        self.release([scratch])

    # -- sessions -----------------------------------------------------------------------------------

    @property
    def live_sequences(self) -> int:
        return self.runner.live_sequences

    def cached_len(self, seq_id: str) -> int | None:
        return self.runner.cached_len(seq_id)

    def release(self, seq_ids: list[str]) -> int:
        return self.runner.release(seq_ids)

    # -- drafting -------------------------------------------------------------------------------------

    def propose(self, requests: list[DraftRequest]) -> list[DraftResult]:
        """Drafts for every request: chains, and trees where asked for and the scratch slots hold a tree's branches
        (otherwise a tree request gets a chain of as many tokens as its shape's levels and node budget allow,
        returned as a chain, ``parents`` None, which the target verifies as one)."""
        ids = [r.seq_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("a sequence may appear only once per propose call")
        results = {r.seq_id: DraftResult.unknown(r.seq_id) for r in requests
                   if not self.runner.can_extend(r.seq_id, r.rollback_to)}
        active = [r for r in requests if r.seq_id not in results]
        for r in active:
            if r.depth > 0 and not r.new_tokens:
                raise ValueError(f"{r.seq_id}: need >= 1 new token to draft from")
        if len(active) > self.num_slots:
            raise ValueError(f"{len(active)} sequences in one call, more than the drafter's {self.num_slots} slots")

        busy = {r.seq_id for r in active}
        claimed = self.runner.claim([(r.seq_id, r.rollback_to, len(r.new_tokens)) for r in active])
        slots = {r.seq_id: slot for r, slot in zip(active, claimed, strict=True)}
        trees = [r for r in active if self._builds_tree(r)]
        chains = [r for r in active if not self._builds_tree(r)]
        try:
            results.update(self._draft_trees(trees, slots))
            drafts, pairs = self._draft(chains, slots)
        except BaseException:
            # A failed decode may leave part of a batch in the cache: forget these sequences rather than hold
            # a cache that differs from what cached_len says (their owners resend them).
            self.runner.release(list(busy))
            raise
        for r in chains:
            tokens = drafts[r.seq_id]
            draft_top_k = None
            if not r.sampling.greedy:
                got = pairs[r.seq_id]
                k = self.num_pairs
                draft_top_k = (torch.stack([p[0] for p in got]) if got else torch.empty(0, k, dtype=torch.long),
                               torch.stack([p[1] for p in got]) if got else torch.empty(0, k))
            results[r.seq_id] = DraftResult(r.seq_id, known=True, tokens=tokens, draft_top_k=draft_top_k,
                                            cached_len=self.runner.cached_len(r.seq_id) or 0)
        return [results[r.seq_id] for r in requests]

    def _draft_count(self, request: DraftRequest) -> int:
        """Tokens to draft: the depth asked for (for a tree, what a chain of its shape and node budget holds),
        cut so that the drafts fed back (all but the last) stay within max_seq_len."""
        count = request.depth
        if request.tree is not None:
            budget = request.tree.nodes if request.max_nodes == 0 else min(request.tree.nodes, request.max_nodes)
            count = min(count, request.tree.levels, budget)
        return max(0, min(count, self.max_seq_len - request.position + 1))

    def _draft(self, requests: list[DraftRequest], slots: dict[str, int]
               ) -> tuple[dict[str, list[int]], dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
        counts = {r.seq_id: self._draft_count(r) for r in requests}
        drafts: dict[str, list[int]] = {r.seq_id: [] for r in requests}
        pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {r.seq_id: [] for r in requests}
        uniforms = {r.seq_id: seeded_uniforms(r.seed, r.position, DRAFT_STREAM, r.depth)
                    for r in requests if not r.sampling.greedy}

        # Position 0 (the slots are rolled back): the new tokens of every sequence, logits at the last one of each
        # that drafts.
        entries = [entry for r in requests for entry in _new_tokens(r, slots[r.seq_id], counts[r.seq_id] > 0)]
        drafting = [r for r in requests if counts[r.seq_id] > 0]
        logits = self.runner.decode(entries)
        for step in range(max(counts.values(), default=0)):
            if step > 0:  # each later position feeds every sequence still drafting its previous draft
                logits = self.runner.decode([(slots[r.seq_id], r.position + step - 1, drafts[r.seq_id][-1], True)
                                             for r in drafting])
            tokens, chosen = sample_drafts(logits, [r.sampling for r in drafting],
                                           [float(uniforms[r.seq_id][step]) if r.seq_id in uniforms else 0.0
                                            for r in drafting], self.num_pairs)
            for r, token, pair in zip(drafting, tokens, chosen, strict=True):
                drafts[r.seq_id].append(token)
                if pair is not None:
                    pairs[r.seq_id].append(pair)
            drafting = [r for r in drafting if len(drafts[r.seq_id]) < counts[r.seq_id]]
        return drafts, pairs

    # -- trees --------------------------------------------------------------------------------------

    def _builds_tree(self, request: DraftRequest) -> bool:
        return (request.tree is not None and request.depth > 0 and request.position < self.max_seq_len
                and _branches(request.tree) <= len(self.runner.scratch_slots))

    def _tree_levels(self, request: DraftRequest) -> int:
        """Levels a tree may have: a path asked about holds at most all but the last level, within max_seq_len."""
        return self.max_seq_len - request.position + 1

    def _draft_trees(self, requests: list[DraftRequest], slots: dict[str, int]) -> dict[str, DraftResult]:
        """A tree per request, grouped by shape, a group built a few sequences at a time so that their branches fit
        the scratch slots; each sequence's slot holds its committed tokens again afterwards."""
        if not requests:
            return {}
        entries = [entry for r in requests for entry in _new_tokens(r, slots[r.seq_id], True)]
        roots = dict(zip((r.seq_id for r in requests), self.runner.decode(entries).clone(), strict=True))
        results: dict[str, DraftResult] = {}
        scratch = self.runner.scratch_slots
        for shape, group in tree_shapes(requests, self._tree_levels).items():
            per_call = len(group) if shape is None else max(1, len(scratch) // _branches(shape))
            for start in range(0, len(group), per_call):
                part = group[start: start + per_call]
                branches = BranchSlots(self.runner, [slots[r.seq_id] for r in part], [r.position for r in part],
                                       torch.stack([roots[r.seq_id] for r in part]), scratch)

                def draft_logprobs(rows: torch.Tensor, paths: torch.Tensor, part: list[DraftRequest] = part,
                                   branches: BranchSlots = branches) -> torch.Tensor:
                    logits = branches.logits(rows.tolist(), [tuple(path) for path in paths.tolist()])
                    return tree_logprobs([part[row].sampling for row in rows.tolist()], logits, self.num_pairs)

                try:
                    tree = build_tree(shape, part, draft_logprobs, self.vocab_size)
                finally:
                    branches.finish()
                for row, r in enumerate(part):
                    results[r.seq_id] = tree_result(r, tree, row, self.num_pairs, self.runner.cached_len(r.seq_id) or 0)
        return results


def _new_tokens(request: DraftRequest, slot: int, logits: bool) -> list[Entry]:
    """The request's new tokens as decode entries on its slot (rolled back), with ``logits`` at the last one."""
    last = len(request.new_tokens) - 1
    return [(slot, request.rollback_to + i, token, logits and i == last) for i, token in enumerate(request.new_tokens)]


def _branches(shape: TreeShape) -> int:
    """The most paths a tree of this shape asks the draft about at once (its widest level but the last), each of
    which may need a slot of its own."""
    if shape.method == "rsd-s":
        return shape.beam_width
    return math.prod(shape.branching[:-1])
