"""Prompt lookup: draft the continuation of the longest recent match of the sequence's suffix.

Model-free (Saxena 2023, "prompt lookup decoding"): for code edits and summaries the answer often
repeats spans of its input, so the tokens that followed an earlier occurrence of the last few
tokens are a cheap and often right guess. The draft is deterministic, so its distribution is a
point mass on each drafted token. Asked for a tree, it merges the continuations of several matches
into a trie (`find_continuations`), each node again a point mass (`specfleet.trees.structure.tree_from_paths`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from specfleet.drafters.base import DraftRequest, DraftResult
from specfleet.trees.structure import tree_from_paths


def find_continuation(tokens: list[int], depth: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """The up to ``depth`` tokens that followed the most recent earlier occurrence of the longest
    suffix of ``tokens`` (of ``max_ngram`` down to ``min_ngram`` tokens); [] when nothing matches."""
    n_tokens = len(tokens)
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        suffix = tokens[n_tokens - n:]
        # Most recent first; the match must end before the suffix itself so something follows it.
        for start in range(n_tokens - n - 1, -1, -1):
            if tokens[start: start + n] == suffix:
                return tokens[start + n: start + n + depth]
    return []


def find_continuations(tokens: list[int], depth: int, max_nodes: int, max_ngram: int = 3, min_ngram: int = 1
                       ) -> list[list[int]]:
    """Distinct continuations of earlier occurrences of the sequence's suffix, best first (longest
    suffix, then most recent), merged as a trie would hold them within ``max_nodes`` nodes: a match
    whose continuation adds nothing new (a prefix of one already taken) is skipped, and the last one
    taken is cut to the nodes left. The first path is ``find_continuation``'s."""
    n_tokens = len(tokens)
    paths: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()  # every prefix of every path taken: the trie's nodes
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        suffix = tokens[n_tokens - n:]
        for start in range(n_tokens - n - 1, -1, -1):
            if len(seen) >= max_nodes:
                return paths
            if tokens[start: start + n] != suffix:
                continue
            path = tokens[start + n: start + n + depth]
            new = [end for end in range(1, len(path) + 1) if tuple(path[:end]) not in seen]
            if not new:
                continue
            path = path[: new[0] + max_nodes - len(seen) - 1]  # shared prefix + what the budget allows
            seen.update(tuple(path[:end]) for end in range(1, len(path) + 1))
            paths.append(path)
    return paths


def point_masses(tokens: list[int] | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The wire's top-K pairs of looked-up tokens: each drafted with certainty (ids [n, 1], probs [n, 1])."""
    return torch.tensor(tokens, dtype=torch.long).view(-1, 1), torch.ones(len(tokens), 1)


def check_ngram_range(min_ngram: int, max_ngram: int) -> None:
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")


class SequenceTexts:
    """Each sequence's committed tokens, kept as its calls give them (roll back to ``rollback_to``, then append the
    new ones): what prompt lookup searches. The latest ``max_sequences`` sequences are kept, the oldest going first."""

    def __init__(self, max_sequences: int) -> None:
        self.max_sequences = max_sequences
        self._tokens: OrderedDict[str, list[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, seq_id: str) -> list[int]:
        return self._tokens[seq_id]

    def update(self, seq_id: str, rollback_to: int, new_tokens: list[int]) -> list[int] | None:
        """The sequence's tokens after this call; None where fewer than ``rollback_to`` of them are held (never
        seen, or gone with the oldest): it must be sent whole again (``rollback_to`` 0)."""
        held = self._tokens.get(seq_id)
        if rollback_to > 0 and (held is None or len(held) < rollback_to):
            return None
        tokens = (held[:rollback_to] if held else []) + list(new_tokens)
        self._tokens[seq_id] = tokens
        self._tokens.move_to_end(seq_id)
        while len(self._tokens) > self.max_sequences:
            self._tokens.popitem(last=False)
        return tokens

    def release(self, seq_ids: list[str]) -> int:
        return sum(self._tokens.pop(s, None) is not None for s in seq_ids)


class NgramDrafter:
    """Keeps each sequence's tokens and drafts by prompt lookup."""

    kind = "ngram"

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1, max_sequences: int = 4096) -> None:
        check_ngram_range(min_ngram, max_ngram)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._texts = SequenceTexts(max_sequences)

    @property
    def live_sequences(self) -> int:
        return len(self._texts)

    def propose(self, requests: list[DraftRequest]) -> list[DraftResult]:
        return [self._propose_one(r) for r in requests]

    def release(self, seq_ids: list[str]) -> int:
        return self._texts.release(seq_ids)

    def _propose_one(self, request: DraftRequest) -> DraftResult:
        tokens = self._texts.update(request.seq_id, request.rollback_to, request.new_tokens)
        if tokens is None:
            return DraftResult.unknown(request.seq_id)
        if request.tree is not None:
            return self._propose_tree(request, tokens)
        draft = find_continuation(tokens, request.depth, self.max_ngram, self.min_ngram)
        draft_top_k = None if request.sampling.greedy else point_masses(draft)
        return DraftResult(request.seq_id, known=True, tokens=draft, draft_top_k=draft_top_k,
                           cached_len=len(tokens))

    def _propose_tree(self, request: DraftRequest, tokens: list[int]) -> DraftResult:
        """Whatever the tree method asked for, a trie of distinct continuations within the node budget
        (the shape's node count, capped by ``max_nodes``); each node's q is a point mass on its token."""
        budget = request.tree.nodes if request.max_nodes == 0 else min(request.tree.nodes, request.max_nodes)
        paths = find_continuations(tokens, request.depth, budget, self.max_ngram, self.min_ngram)
        tree = tree_from_paths(paths, vocab_size=1 + max((t for p in paths for t in p), default=0))
        nodes = tree.tokens[0].tolist()
        draft_top_k = None if request.sampling.greedy else point_masses(nodes)
        return DraftResult(request.seq_id, known=True, tokens=nodes, draft_top_k=draft_top_k,
                           cached_len=len(tokens), parents=tree.parents[0].tolist())
