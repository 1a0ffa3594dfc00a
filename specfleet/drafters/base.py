"""The one small interface every drafter implements, and the records that cross it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from specfleet.sampling_params import SamplingParams
from specfleet.trees.shapes import TreeShape


@dataclass(frozen=True)
class DraftRequest:
    """Roll ``seq_id`` back to ``rollback_to`` tokens, append ``new_tokens`` (committed), then draft
    up to ``depth`` tokens with ``sampling``; ``seed`` with the position makes the draft reproducible.
    With ``tree``, draft a tree of that shape instead (at most ``depth`` levels and ``max_nodes`` nodes)."""

    seq_id: str
    rollback_to: int
    new_tokens: list[int]
    depth: int
    sampling: SamplingParams
    seed: int = 0
    tree: TreeShape | None = None
    max_nodes: int = 0  # 0: as many as the shape has

    @property
    def position(self) -> int:
        """Index of the first draft token in the sequence."""
        return self.rollback_to + len(self.new_tokens)


@dataclass
class DraftResult:
    seq_id: str
    known: bool  # False: no state for seq_id, the caller must resend the whole sequence
    tokens: list[int]
    # The exact distribution each token was drawn from, as the wire's top-K pairs (ids [n, K], probs [n, K]);
    # None for greedy requests.
    draft_top_k: tuple[torch.Tensor, torch.Tensor] | None
    cached_len: int  # tokens of the sequence the drafter holds after this call
    # For a tree: each node's parent (ROOT_PARENT for the root's children), ``tokens`` holding the nodes and
    # ``draft_top_k`` one distribution per node (given its earlier siblings); None for a chain.
    parents: list[int] | None = None

    @classmethod
    def unknown(cls, seq_id: str) -> DraftResult:
        return cls(seq_id, known=False, tokens=[], draft_top_k=None, cached_len=0)


class Drafter(Protocol):
    """Proposes draft tokens for a batch of sequences it keeps as sessions."""

    kind: str

    def propose(self, requests: list[DraftRequest]) -> list[DraftResult]: ...

    def release(self, seq_ids: list[str]) -> int: ...

    @property
    def live_sequences(self) -> int: ...

