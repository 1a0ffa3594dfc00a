"""How a target drafts for itself in the pass that verifies (the self-drafted strategy): what a sequence's pass adds
after its candidates, and what the next candidates are once the verdict is known. Two kinds, one interface the
verifier runs (`target_service.verifier.Verifier`):
- `SpaceDrafting`: SPACE's mask groups (`specfleet.space`), for a model fine-tuned by `specfleet train-space`;
- `LookaheadDrafting`: a Jacobi chain and an n-gram pool per sequence (`specfleet.lookahead`), for any model;
- `PromptLookupDrafting`: prompt lookup in the sequence's own text (`specfleet.drafters.ngram`), for any model and
  either backend: it adds nothing to the pass, and saves the step a draft service's round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from specfleet.drafters.ngram import SequenceTexts, check_ngram_range, find_continuation, point_masses
from specfleet.lookahead import LookaheadState, advance, candidates_after, initial_guesses, lookahead_layout
from specfleet.sampling import DRAFT_STREAM, sample_drafts, seeded_uniforms
from specfleet.space import space_layout, space_pass_tokens
from specfleet.trees.shapes import ROOT_PARENT

if TYPE_CHECKING:
    from target_service.verifier import VerifyItem

TopKPairs = tuple[torch.Tensor, torch.Tensor]  # ids [n, K], probs [n, K]: one distribution per next draft


@dataclass(frozen=True)
class PassNodes:
    """A sequence's nodes after its root in a self-drafting pass: its candidates first (node j is c_{j+1}, so the
    logits at the root and the candidates are rows 0..k, as for a chain), then whatever drafts the next step."""

    tokens: list[int]
    parents: list[int]
    extra: object  # what the kind needs to read its drafting rows back


def looked_up(drafts: tuple[int, ...], item: VerifyItem) -> tuple[tuple[int, ...], TopKPairs | None]:
    """Candidates that were looked up, not drawn, as `SelfDrafting.next_drafts` returns them: for a sampled request
    each with its q, a point mass on itself."""
    if item.sampling.greedy or not drafts:
        return drafts, None
    return drafts, point_masses(drafts)


class SelfDrafting(Protocol):
    kind: str  # "space", "lookahead" or "ngram" (GetInfo's self_drafting)
    # Whether a pass carries nodes of the kind's own after the candidates (SPACE's masks, lookahead's Jacobi chain):
    # such a pass runs with tree attention; one that adds none runs as the plain chains do, on either backend.
    adds_nodes: bool

    @property
    def max_draft_next(self) -> int:
        """Most next-step drafts a sequence may ask for."""
        ...

    @property
    def width(self) -> int:
        """Positions a step adds to each sequence whatever it drafts (GetInfo's draft_next_width)."""
        ...

    def added_tokens(self, candidates: int, draft_next: int) -> int:
        """Positions a pass adds after the root, for the telemetry's tokens per sequence."""
        ...

    def nodes(self, item: VerifyItem, room: int) -> PassNodes:
        """The pass's nodes for ``item``, at most ``room`` of them (what its cache has left)."""
        ...

    def next_drafts(self, item: VerifyItem, nodes: PassNodes, logits: torch.Tensor, accepted: int,
                    emitted: list[int]) -> tuple[tuple[int, ...], TopKPairs | None]:
        """The next step's drafts once ``accepted`` candidates were accepted and ``emitted`` committed, from the pass's
        ``logits`` (row 0: the root, row j + 1: node j), with their q for a sampled request (None for greedy)."""
        ...

    def release(self, seq_ids: list[str]) -> None: ...


@dataclass(frozen=True)
class SpaceDrafting:
    """SPACE: a group of masks after the root and after each candidate; the group after the last accepted candidate
    proposes the next candidates (greedy: the argmax; sampled: drawn from the processed distribution's top-K)."""

    mask_token: int
    max_masks: int
    top_k_pairs: int = 64  # a sampled next draft's distribution on the wire, as the model drafters send it
    kind: str = "space"
    adds_nodes: bool = True

    @property
    def max_draft_next(self) -> int:
        return self.max_masks

    @property
    def width(self) -> int:
        return 0

    def added_tokens(self, candidates: int, draft_next: int) -> int:
        return space_pass_tokens(candidates, draft_next)

    def nodes(self, item: VerifyItem, room: int) -> PassNodes:
        # Fewer masks where the pass would outgrow the cache (none: no next drafts).
        k = len(item.draft_tokens)
        masks = max(0, min(item.draft_next, (room - k) // (k + 1)))
        layout = space_layout(item.draft_tokens, masks, self.mask_token)
        return PassNodes(layout.tokens, layout.parents, layout)

    def next_drafts(self, item: VerifyItem, nodes: PassNodes, logits: torch.Tensor, accepted: int,
                    emitted: list[int]) -> tuple[tuple[int, ...], TopKPairs | None]:
        rows = nodes.extra.group_rows(accepted)  # type: ignore[attr-defined]
        if not len(rows):
            return (), None
        # The next step's first draft sits right after the token this step emits: seeded from where it sits.
        first = item.position + accepted + 1
        tokens, pairs = sample_drafts(logits[rows.start:rows.stop], [item.sampling] * len(rows),
                                      seeded_uniforms(item.seed, first, DRAFT_STREAM, len(rows)).tolist(),
                                      self.top_k_pairs)
        if item.sampling.greedy:
            return tuple(tokens), None
        return tuple(tokens), (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))

    def release(self, seq_ids: list[str]) -> None:
        pass


class LookaheadDrafting:
    """Lookahead: a Jacobi chain of ``window`` guesses after the root; its outputs fill the sequence's pool with
    n-grams of ``ngram`` tokens (the latest ``pool_size`` continuations per first token), and the pool proposes the
    next candidates after the emitted token (a sampled request's q for each is a point mass: looked up, not drawn)."""

    kind = "lookahead"
    adds_nodes = True

    def __init__(self, window: int, ngram: int, pool_size: int = 8) -> None:
        self.window, self.ngram, self.pool_size = window, ngram, pool_size
        self.states: dict[str, LookaheadState] = {}

    @property
    def max_draft_next(self) -> int:
        return self.ngram - 1

    @property
    def width(self) -> int:
        return self.window

    def added_tokens(self, candidates: int, draft_next: int) -> int:
        return candidates + self.window

    def nodes(self, item: VerifyItem, room: int) -> PassNodes:
        state = self.states.get(item.seq_id)
        if state is None or item.rollback_to == 0:  # a new sequence, or one sent again whole
            state = self.states[item.seq_id] = LookaheadState(initial_guesses(item.new_tokens, self.window))
        layout = lookahead_layout(item.draft_tokens, state.guesses[: max(0, room - len(item.draft_tokens))])
        return PassNodes(layout.tokens, layout.parents, (layout, state))

    def next_drafts(self, item: VerifyItem, nodes: PassNodes, logits: torch.Tensor, accepted: int,
                    emitted: list[int]) -> tuple[tuple[int, ...], TopKPairs | None]:
        layout, state = nodes.extra  # type: ignore[misc]
        rows = layout.guess_rows
        advance(state, int(logits[0].argmax()), logits[rows.start:rows.stop].argmax(dim=-1).tolist(), emitted,
                self.ngram, self.pool_size)
        return looked_up(candidates_after(state, emitted[-1], item.draft_next), item)

    def release(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            self.states.pop(seq_id, None)


class PromptLookupDrafting:
    """Prompt lookup (the ``ngram`` drafter's, `specfleet.drafters.ngram.find_continuation`) done by the target once
    its verdict is known: the next candidates are the up to ``draft_next`` tokens that followed the latest earlier
    occurrence of the sequence's last ``min_ngram``..``max_ngram`` tokens, the ones just committed included. The
    pass runs the candidates alone, as any chain; what a step saves is the draft service's round trip. The target
    keeps each sequence's tokens for the lookup (the latest ``max_sequences``), recorded on every verify of it, so a
    sequence whose steps alternate plain and drafting keeps its whole text. A sampled request's q for each candidate
    is a point mass: looked up, not drawn."""

    kind = "ngram"
    adds_nodes = False
    width = 0

    def __init__(self, max_drafts: int, max_ngram: int = 3, min_ngram: int = 2, max_sequences: int = 4096) -> None:
        check_ngram_range(min_ngram, max_ngram)
        self.max_drafts, self.max_ngram, self.min_ngram = max_drafts, max_ngram, min_ngram
        self.texts = SequenceTexts(max_sequences)  # by seq_id: its committed tokens

    @property
    def max_draft_next(self) -> int:
        return self.max_drafts

    def added_tokens(self, candidates: int, draft_next: int) -> int:
        return candidates

    def nodes(self, item: VerifyItem, room: int) -> PassNodes:
        k = min(len(item.draft_tokens), room)
        return PassNodes(list(item.draft_tokens[:k]), [ROOT_PARENT, *range(k - 1)] if k else [], None)

    def next_drafts(self, item: VerifyItem, nodes: PassNodes, logits: torch.Tensor, accepted: int,
                    emitted: list[int]) -> tuple[tuple[int, ...], TopKPairs | None]:
        # None: the target no longer holds its earlier tokens (gone with the oldest texts); it drafts nothing until
        # it is sent whole again.
        text = self.texts.update(item.seq_id, item.rollback_to, [*item.new_tokens, *emitted])
        if text is None or not item.draft_next:
            return (), None
        return looked_up(tuple(find_continuation(text, item.draft_next, self.max_ngram, self.min_ngram)), item)

    def release(self, seq_ids: list[str]) -> None:
        self.texts.release(seq_ids)
