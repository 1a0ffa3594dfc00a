"""What speculation did, counted one way everywhere: per sequence, per step, and fleet-wide.

`SequenceStep` is how one sequence's step went. `AcceptanceCounts` adds them up (`observe`) and merges with
another (`merge`): each live request keeps one, each step's `StepStats` holds one for its batch, the telemetry
writer merges the steps' into what it sends to Redis, and the policy's reader merges the fleet's. The step loop
hands each step's `StepStats` to its observers (Redis telemetry, OpenTelemetry, the prediction audit), which
each know what they do with it; the loop knows none of them.

Mean accepted tokens per step that drafted are accepted / sequence_steps; the acceptance estimate the policy
uses is first_accepted / (first_accepted + rejections) (see `specfleet.policy.acceptance_estimate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specfleet.policy.costs import AheadOverlap
from specfleet.speculation import Proposal, Verdict
from specfleet.trees.shapes import count_tries


@dataclass(frozen=True)
class SequenceStep:
    """How one sequence's step went.

    ``requested``: the draft tokens its plan asked for (a tree's node budget; 0: plain decoding); ``drafted``
    and ``accepted``: the draft tokens verified and accepted. ``first_rejected`` counts rejected first tries:
    for a chain 1 when it ended before the depth asked for, rejected or cut short by a drafter with nothing
    more to offer (the next position asked for emitted no draft token), for a tree its rejected first tries.
    A tree's later siblings count apart (``later_siblings_*``): they are accepted less often. ``emitted``:
    the tokens the sequence kept (fewer than the verdict's when a stop condition came first).
    """

    requested: int
    drafted: int = 0
    accepted: int = 0
    first_rejected: int = 0
    later_siblings_accepted: int = 0
    later_siblings_tried: int = 0
    emitted: int = 0

    @classmethod
    def of(cls, requested: int, proposal: Proposal | None, verdict: Verdict, emitted: int) -> SequenceStep:
        drafted = len(proposal.tokens) if proposal is not None else 0
        if proposal is not None and proposal.first:
            # A self-drafting target's first step for the sequence (or its first after a plain one): it verifies
            # nothing and drafts for the next; not a drafter that came up empty, so not a miss.
            return cls(0, emitted=emitted)
        if requested > 0 and drafted == 0:  # a miss: it says nothing of acceptance
            return cls(requested, emitted=emitted)
        if proposal is not None and proposal.parents is not None:
            tries = count_tries(proposal.parents, verdict.accepted_nodes)
            return cls(requested, drafted, verdict.accepted, tries.first_rejected, tries.later_siblings_accepted,
                       tries.later_siblings_tried, emitted)
        return cls(requested, drafted, verdict.accepted, int(verdict.accepted < requested), emitted=emitted)

    @property
    def asked(self) -> bool:
        """Whether the sequence asked for drafts (one that got drafts asked for them)."""
        return self.requested > 0 or self.drafted > 0

    @property
    def missed(self) -> bool:
        """Asked, and the drafter offered nothing (an n-gram drafter without a match)."""
        return self.asked and self.drafted == 0


@dataclass
class AcceptanceCounts:
    """Counts over the sequence-steps that asked for drafts.

    ``accepted`` counts accepted drafts, ``rejections`` rejected first tries (for a chain: steps in which it
    stopped short), ``misses`` steps in which the drafter offered nothing; ``later_siblings_accepted`` and
    ``later_siblings_tried`` count a tree's later siblings (their acceptances are among ``accepted`` too);
    ``proposed_by_position[j]`` and ``accepted_by_position[j]`` count drafts at position j (0: the first).
    """

    sequence_steps: int = 0
    accepted: int = 0
    rejections: int = 0
    misses: int = 0
    later_siblings_accepted: int = 0
    later_siblings_tried: int = 0
    proposed_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)

    @property
    def drafted(self) -> int:
        return sum(self.proposed_by_position)

    @property
    def first_accepted(self) -> int:
        """Accepted drafts that were the first child tried at their node (every accepted draft of a chain)."""
        return self.accepted - self.later_siblings_accepted

    @property
    def later_siblings_rejected(self) -> int:
        return self.later_siblings_tried - self.later_siblings_accepted

    @property
    def offers(self) -> int:
        """Sequence-steps in which the drafter offered at least one token."""
        return self.sequence_steps - self.misses

    def observe(self, step: SequenceStep) -> None:
        """Counts ``step`` if it asked for drafts."""
        if not step.asked:
            return
        self.sequence_steps += 1
        self.misses += step.missed
        self.accepted += step.accepted
        self.rejections += step.first_rejected
        self.later_siblings_accepted += step.later_siblings_accepted
        self.later_siblings_tried += step.later_siblings_tried
        _add_prefix(self.proposed_by_position, step.drafted)
        _add_prefix(self.accepted_by_position, step.accepted)

    def merge(self, other: AcceptanceCounts) -> None:
        self.sequence_steps += other.sequence_steps
        self.misses += other.misses
        self.accepted += other.accepted
        self.rejections += other.rejections
        self.later_siblings_accepted += other.later_siblings_accepted
        self.later_siblings_tried += other.later_siblings_tried
        for mine, theirs in ((self.proposed_by_position, other.proposed_by_position),
                             (self.accepted_by_position, other.accepted_by_position)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for j, n in enumerate(theirs):
                mine[j] += n

    def empty(self) -> bool:
        return self.sequence_steps == 0


def _add_prefix(counts: list[int], length: int) -> None:
    """One more at each of positions 0..length-1."""
    counts.extend([0] * (length - len(counts)))
    for j in range(length):
        counts[j] += 1


@dataclass
class RequestStats:
    """One request's speculation so far, as its responses report it."""

    acceptance: AcceptanceCounts = field(default_factory=AcceptanceCounts)
    steps: int = 0  # steps it took part in
    drafted: int = 0  # draft tokens verified for it
    emitted: int = 0
    last_drafted: int = 0  # draft tokens (a tree's nodes) verified in its latest step
    last_reason: str = ""  # why the policy chose that step's plan
    # With several draft pools: its acceptance with each pool's drafter, by pool name (what the policy chooses on).
    by_pool: dict[str, AcceptanceCounts] = field(default_factory=dict)
    last_pool: str = ""  # the pool of its latest step that drafted

    def observe(self, step: SequenceStep, reason: str, pool: str = "") -> None:
        """One step of the request; ``pool``: the draft pool it drafted from, if it did (and the router has one)."""
        self.acceptance.observe(step)
        if pool and step.asked:
            self.by_pool.setdefault(pool, AcceptanceCounts()).observe(step)
            self.last_pool = pool
        self.steps += 1
        self.drafted += step.drafted
        self.emitted += step.emitted
        self.last_drafted = step.drafted
        self.last_reason = reason

    def summary(self) -> SpeculationSummary:
        accepted = self.acceptance.accepted
        return SpeculationSummary(
            self.steps, self.drafted, accepted, accepted / self.drafted if self.drafted else 0.0,
            self.emitted / self.steps if self.steps else 0.0, self.last_drafted, self.last_reason)


@dataclass(frozen=True)
class SpeculationSummary:
    """A request's stats at one moment, as a response carries them."""

    steps: int
    drafted_tokens: int
    accepted_tokens: int
    acceptance_rate: float  # accepted / drafted (0 when nothing was drafted)
    mean_tokens_per_step: float
    last_drafted: int
    reason: str


@dataclass
class StepStats:
    """What one router step did, handed to the step's observers once it is done."""

    target: str  # the target replica the step ran on
    batch_size: int
    planned: list[int]  # draft tokens planned per sequence (a tree's node budget)
    deepest: int  # the most levels any sequence was asked to draft
    draft_ms: float = 0.0  # the drafters' compute time (the slowest replica's)
    verify_ms: float = 0.0  # the target's compute time
    predicted_ms: float = 0.0  # the policy's prediction of the step's time (0: none)
    predicted_tokens: float = 0.0  # and of the tokens it emits, all sequences
    prefilled: bool = False  # some sequence (re)sent a whole prompt (see `StepPlan.prefills`)
    overlap: AheadOverlap | None = None  # drafting ahead: the draft made ahead and the verify, as predicted
    acceptance: AcceptanceCounts = field(default_factory=AcceptanceCounts)
    # The same counts by the kind of drafter that drafted (None: not known, or the target drafted itself).
    acceptance_by_drafter: dict[str | None, AcceptanceCounts] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)  # accepted drafts, per sequence that got drafts
    emitted: int = 0  # tokens emitted, all sequences
    first_token_s: list[float] = field(default_factory=list)  # time to first token of those that got theirs
    inter_token_s: list[float] = field(default_factory=list)  # of the others that got tokens: time since their last
    reason: str = ""  # why the policy chose the step's plan (with several draft pools: which pool drafted for whom)
    duration_s: float = 0.0

    @property
    def drafted(self) -> bool:
        """Whether the step asked any sequence for drafts."""
        return self.deepest > 0

    def observe(self, step: SequenceStep, drafter: str | None = None) -> None:
        """One sequence's part; ``drafter``: the kind of drafter it drafted with."""
        self.acceptance.observe(step)
        if step.asked:
            self.acceptance_by_drafter.setdefault(drafter, AcceptanceCounts()).observe(step)
        self.emitted += step.emitted
        if step.drafted:
            self.accepted.append(step.accepted)
