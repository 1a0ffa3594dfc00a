"""The values one speculative step hands from phase to phase, free of protobuf and torch.

A step of the router's loop reads: choose a `StepPlan` -> a `Proposal` per sequence from its strategy -> a
`Verdict` per sequence from the target -> commit and emit -> observe. The transport adapters convert these
values to and from the wire; the loop, the strategies and the stats see only these.

Words, each used for one thing (as in Leviathan et al. 2023 and vLLM's rejection sampler):
- *draft tokens*: what a drafter proposes for one sequence in one step, a chain or a tree of nodes;
- *accepted* drafts: the prefix (a chain) or path (a tree) the target agrees with;
- the *recovered* token: sampled by the target from its residual after a rejection; the *bonus* token: the
  target's own next token when every draft on the path was accepted. A step emits accepted + 1 tokens;
- *draft top-K*: the exact distribution a sampled draft token was drawn from, sent as its top-K (token id,
  probability) pairs (`TopK`); greedy requests send none;
- in a tree, the *first try* at a node is its first child, tried as a chain's draft is; a *later sibling* is
  tried only after its elder siblings were rejected;
- an *offer* is a step in which a sequence asked for drafts and got some; a *miss*, one in which it got none.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from specfleet.policy.costs import AheadOverlap
from specfleet.sampling_params import SamplingParams
from specfleet.trees.shapes import TreeShape


@dataclass(frozen=True)
class TopK:
    """The distribution one draft token was drawn from, as its top-K (token id, probability) pairs: the drafter
    samples from its processed distribution truncated to K entries and renormalised, so these pairs are exact."""

    token_ids: tuple[int, ...]
    probs: tuple[float, ...]


@dataclass(frozen=True)
class Proposal:
    """One sequence's draft tokens for one step: a chain, or a tree when ``parents`` is given.

    ``draft_top_k`` holds one `TopK` per token for sampled requests (none for greedy ones). A tree lists its
    nodes with every parent before its children and siblings in the order drawn; ``parents[j]`` is node j's
    parent, `specfleet.trees.shapes.ROOT_PARENT` for the root's children. ``draft_next`` asks the target to
    propose this many draft tokens for the sequence's next step from the same forward pass (self-drafting);
    the verdict then carries them as its ``next_proposal``. ``first`` marks a self-drafted sequence's step with no
    candidates held yet (its first, or its first after a plain step): it only drafts, so its empty chain is not a
    miss; a step whose target proposed nothing last time (prompt lookup without a match) is one.
    """

    tokens: tuple[int, ...]
    draft_top_k: tuple[TopK, ...] = ()
    parents: tuple[int, ...] | None = None
    draft_next: int = 0
    first: bool = False

    @property
    def is_tree(self) -> bool:
        return self.parents is not None


@dataclass(frozen=True)
class Verdict:
    """What the target made of one sequence's proposal (or of no proposal: plain decoding).

    ``tokens`` are the accepted drafts followed by the recovered or bonus token, so every step emits at least
    one; for a tree ``accepted_nodes`` is the accepted path, node indices from the root's child down (what the
    policy needs to count first tries and later siblings, see `specfleet.trees.shapes.count_tries`).
    """

    tokens: tuple[int, ...]
    accepted: int
    accepted_nodes: tuple[int, ...] = ()
    next_proposal: Proposal | None = None


@dataclass(frozen=True)
class DraftPlan:
    """What one sequence drafts in a step: a chain of ``levels`` tokens, or a tree of shape ``tree`` with that
    many levels; nothing when ``levels`` is 0."""

    levels: int = 0
    tree: TreeShape | None = None

    @property
    def tokens(self) -> int:
        """Draft tokens planned: the chain's depth, or the tree's node budget."""
        return self.tree.nodes if self.tree is not None else self.levels


NO_DRAFTS = DraftPlan()


@dataclass(frozen=True)
class StepPlan:
    """The policy's plan for one step: each sequence's `DraftPlan`, why, and what it predicts the step takes
    (``predicted_ms``) and emits over all sequences (``predicted_tokens``; both 0 when it predicts nothing)."""

    drafts: Mapping[str, DraftPlan]
    reason: str
    predicted_ms: float = 0.0
    predicted_tokens: float = 0.0
    prefills: bool = False
    """Whether some sequence (re)sends a whole prompt this step: its time is then over the prediction by the
    prompt's cost, which the cost model leaves out."""
    overlap: AheadOverlap | None = None
    """Drafting ahead, the draft made ahead and the verify beside it as the prediction priced them (for measuring how
    much the two slow each other, `router.prediction_audit.ContentionFit`)."""
    no_catch_up: frozenset[str] = frozenset()
    """The sequences whose drafter lacks their prompt and is not to compute it now, not even alongside the target
    (`specfleet.policy.catch_up`: it would cost more than drafting would save them)."""

    def draft(self, seq_id: str) -> DraftPlan:
        return self.drafts.get(seq_id, NO_DRAFTS)

    @property
    def deepest(self) -> int:
        """The most levels any sequence drafts."""
        return max((d.levels for d in self.drafts.values()), default=0)


T = TypeVar("T")


@dataclass
class ByRequest(Mapping[str, T], Generic[T]):
    """A batch's answers by seq_id, with the time the answering side computed for (the slowest replica's
    compute when several answered in parallel). Sequences without an answer are absent."""

    answers: dict[str, T] = field(default_factory=dict)
    compute_ms: float = 0.0

    def __getitem__(self, seq_id: str) -> T:
        return self.answers[seq_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.answers)

    def __len__(self) -> int:
        return len(self.answers)


Proposals = ByRequest[Proposal]
Verdicts = ByRequest[Verdict]


PREFILL_TOKENS = 18
"""Most tokens a call sends a sequence in a step: the accepted drafts plus one (17 at the deepest). More is a
(re)prefill of a whole prompt, whose cost is the prompt's: the cost model leaves such calls out."""


def is_prefill(new_tokens: list[int]) -> bool:
    """Whether a call (re)sends a whole prompt rather than a step's tokens (see `PREFILL_TOKENS`)."""
    return len(new_tokens) > PREFILL_TOKENS


@dataclass(frozen=True)
class SessionDelta:
    """What a service must do to its cached copy of a sequence before working on it: roll back to
    ``rollback_to`` tokens, then append ``new_tokens`` (all of them when ``rollback_to`` is 0)."""

    seq_id: str
    rollback_to: int
    new_tokens: list[int]


@dataclass(frozen=True)
class DraftAsk:
    """One sequence's entry in a call to a drafter."""

    delta: SessionDelta
    plan: DraftPlan
    sampling: SamplingParams
    seed: int


@dataclass(frozen=True)
class VerifyAsk:
    """One sequence's entry in a call to the target: its proposal, or None for plain decoding."""

    delta: SessionDelta
    proposal: Proposal | None
    sampling: SamplingParams
    seed: int


@dataclass
class SessionReply(Generic[T]):
    """A service's answer to one batched call: an answer and the tokens it now holds (``cached_len``) for each
    sequence it knew, the seq_ids it did not (restarted or evicted: resend their whole context), and its compute
    time for the batch."""

    answers: dict[str, T]
    cached_len: dict[str, int]
    unknown: list[str]
    compute_ms: float
    draining: bool = False  # the service is shutting down: it finishes what it holds but takes nothing new
