"""Prompt lookup: draft the continuation of the longest recent match of the sequence's suffix.

Model-free (Saxena 2023, "prompt lookup decoding"): for code edits and summaries the answer often
repeats spans of its input, so the tokens that followed an earlier occurrence of the last few
tokens are a cheap and often right guess. The draft is deterministic, so its distribution is a
point mass on each drafted token.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from specfleet.drafters.base import DraftRequest, DraftResult


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


class NgramDrafter:
    """Keeps each sequence's tokens and drafts by prompt lookup."""

    kind = "ngram"

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1, max_sequences: int = 4096) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.max_sequences = max_ngram, min_ngram, max_sequences
        self._tokens: OrderedDict[str, list[int]] = OrderedDict()

    @property
    def live_sequences(self) -> int:
        return len(self._tokens)

    def propose(self, requests: list[DraftRequest]) -> list[DraftResult]:
        return [self._propose_one(r) for r in requests]

    def release(self, seq_ids: list[str]) -> int:
        return sum(self._tokens.pop(s, None) is not None for s in seq_ids)

    def _propose_one(self, request: DraftRequest) -> DraftResult:
        held = self._tokens.get(request.seq_id)
        if request.rollback_to > 0 and (held is None or len(held) < request.rollback_to):
            return DraftResult.unknown(request.seq_id)
        tokens = (held[: request.rollback_to] if held else []) + list(request.new_tokens)
        self._remember(request.seq_id, tokens)
        draft = find_continuation(tokens, request.depth, self.max_ngram, self.min_ngram)
        draft_probs = None
        if not request.sampling.greedy:
            draft_probs = (torch.tensor(draft, dtype=torch.long).view(-1, 1), torch.ones(len(draft), 1))
        return DraftResult(request.seq_id, known=True, tokens=draft, draft_probs=draft_probs,
                           cached_len=len(tokens))

    def _remember(self, seq_id: str, tokens: list[int]) -> None:
        self._tokens[seq_id] = tokens
        self._tokens.move_to_end(seq_id)
        while len(self._tokens) > self.max_sequences:
            self._tokens.popitem(last=False)
