"""Drafting ahead (DuoDecoding, arXiv 2503.00784): the drafter drafts step t+1 while the target verifies step t.

As soon as a sequence's step-t drafts are known, two calls go out at once: the target's Verify of them, and a
`Propose` that continues them as if all were accepted, one token deeper than the sequence drafted: the first token
made ahead guesses the target's own token at the bonus position. When the verdict accepted every draft and its
bonus token is that guess, the rest of the drafts made ahead are step t+1's proposal, already there: their
drafting overlapped the verify and cost no wall time. Otherwise they are dropped, and the drafter's next call rolls
its session back past them.

Lossless as any drafting: drafts made ahead are drafts, drawn from the drafter's exact q given the tokens that
were then committed, and verified by the target at step t+1 like any others. The bonus token is the target's own,
sampled at step t as always; the guess only decides whether the drafts made ahead are of use. (For a sampled
request the guess comes true with probability sum_x p(x) q(x), less than rejection sampling's sum_x min(p, q):
checking it against p would need the target's distribution at the bonus position on the router.)

A step is then priced at the longer of drafting and verifying, not their sum, when the drafts made ahead come true
(see `specfleet.policy.costs.price_step`); the policy sizes drafts to fit inside the verify they overlap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

from router.draft_pool import DraftCall, DraftPool, keep_accepted
from router.live_request import LiveRequest
from router.replicas import DraftReplica
from specfleet.otel import RouterMetrics
from specfleet.speculation import DraftPlan, Proposal, Proposals, StepPlan, Verdict
from specfleet.token_paths import common_prefix_length

AheadReply = tuple[Proposal | None, int]
"""What a call made ahead brought back for one sequence: its drafts (None when the call failed) and the tokens of
its context the drafter then held."""


@dataclass
class Ahead:
    """One sequence's drafts being made ahead while its step's verify runs."""

    draft: DraftReplica  # the replica asked (a sequence moved to another since cannot use them)
    context: list[int]  # the committed tokens then, followed by that step's drafts
    position: int  # how many of ``context`` were committed then
    held: int  # tokens of ``context`` the drafter held when asked: it holds at least these afterwards
    task: asyncio.Task[AheadReply]


class DraftAhead:
    """A draft pool whose drafters work while the target verifies (a `router.ports.Proposer`)."""

    def __init__(self, pool: DraftPool, metrics: RouterMetrics) -> None:
        self.pool = pool
        self.metrics = metrics
        self._ahead: dict[str, Ahead] = {}
        # By seq_id, for sequences drafted now and not ahead (trees, a drafter that gave none): as `DraftPool`'s.
        self._drafted: dict[str, tuple[int, int]] = {}
        self.outcomes = {"used": 0, "dropped": 0}  # drafts made ahead, as specfleet_drafts_ahead_total counts them

    def room(self, seq: LiveRequest) -> int | None:
        return self.pool.room(seq)

    async def propose(self, batch: list[LiveRequest], plan: StepPlan) -> Proposals:
        started = time.perf_counter()
        ready = await self._collect(batch, plan)  # usually done: they were drafted during the last verify
        waited_ms = (time.perf_counter() - started) * 1000
        calls = [DraftCall(seq, seq.tokens, seq.draft_cached, plan.draft(seq.seq_id)) for seq in batch
                 if plan.draft(seq.seq_id).levels > 0 and seq.seq_id not in ready]
        drafted_now, held_now = await self.pool.draft(calls)
        proposals = {seq_id: proposal for seq_id, (proposal, _) in ready.items()} | drafted_now.answers
        held_by_seq = {seq_id: held for seq_id, (_, held) in ready.items()} | held_now
        self._drafted = {}
        for seq in batch:
            proposal = proposals.get(seq.seq_id)
            if proposal is None:
                continue
            context = seq.tokens + list(proposal.tokens)
            held = held_by_seq[seq.seq_id]
            if proposal.is_tree or not proposal.tokens or seq.draft is None:
                self._drafted[seq.seq_id] = (held, len(seq.tokens))
                continue
            self._start(seq, context, min(held, len(context) - 1), plan.draft(seq.seq_id))
        self.pool.start_prefills(batch, plan)
        return Proposals(proposals, waited_ms + drafted_now.compute_ms)

    def settle(self, batch: list[LiveRequest], verdicts: Mapping[str, Verdict]) -> None:
        # Drafts made ahead are judged when the next step needs them (`_collect`), once their call has answered.
        keep_accepted(batch, self._drafted, verdicts)
        self._drafted = {}

    async def release(self, seqs: list[LiveRequest]) -> None:
        # A call made ahead that is still running would bring the sequence back on its drafter: let it answer first.
        pending = [a.task for seq in seqs if (a := self._ahead.pop(seq.seq_id, None)) is not None]
        await asyncio.gather(*pending, return_exceptions=True)
        await self.pool.release(seqs)

    def _start(self, seq: LiveRequest, context: list[int], held: int, plan: DraftPlan) -> None:
        """Asks the drafter, now, for the step after this one: ``plan``'s levels and one more, after ``context``."""
        ahead_plan = DraftPlan(plan.levels + 1)
        call = DraftCall(seq, context, held, ahead_plan)
        task = asyncio.get_running_loop().create_task(self._draft_ahead(call))
        self._ahead[seq.seq_id] = Ahead(seq.draft, context, len(seq.tokens), held, task)

    async def _draft_ahead(self, call: DraftCall) -> AheadReply:
        proposals, held = await self.pool.draft([call])
        seq_id = call.seq.seq_id
        return proposals.get(seq_id), held.get(seq_id, call.held)

    async def _collect(self, batch: list[LiveRequest], plan: StepPlan) -> dict[str, tuple[Proposal, int]]:
        """The proposals that drafts made ahead give this step, by seq_id, each with the tokens its drafter holds of
        the sequence's tokens followed by the proposal; every other sequence's drafts made ahead are dropped, its
        drafter's session rolled back to the tokens it holds that were committed."""
        pending = [(seq, a) for seq in batch if (a := self._ahead.pop(seq.seq_id, None)) is not None]
        if not pending:
            return {}
        replies = await asyncio.gather(*(a.task for _, a in pending))
        ready: dict[str, tuple[Proposal, int]] = {}
        for (seq, ahead), reply in zip(pending, replies, strict=True):
            if seq.draft is not ahead.draft:  # it moved to another drafter, which starts it afresh
                continue
            proposal, seq.draft_cached = usable_ahead(seq.tokens, ahead, reply, plan.draft(seq.seq_id))
            self.outcomes["used" if proposal is not None else "dropped"] += 1
            self.metrics.record_drafts_ahead(used=proposal is not None)
            if proposal is not None:
                # It holds the context asked about, then the drafts made ahead it fed itself: the first is the
                # token just committed, the next ones the proposal.
                ready[seq.seq_id] = (proposal, reply[1])
        return ready


def usable_ahead(tokens: list[int], ahead: Ahead, reply: AheadReply, plan: DraftPlan) -> tuple[Proposal | None, int]:
    """What drafts made ahead give a sequence that now holds ``tokens``: the proposal for this step (None when they
    came to nothing), and how many of ``tokens`` its drafter holds, which its next call rolls back to.

    They are of use when the last step committed every draft they continued and then the token they guessed first;
    the proposal is the rest, up to ``plan``'s levels (a tree plan drafts afresh)."""
    drafts, held = reply
    agreed = ahead.position + common_prefix_length(ahead.context[ahead.position:], tokens[ahead.position:])
    if drafts is None:  # the call failed: the drafter holds at least what it held when asked
        return None, min(ahead.held, agreed)
    came_true = (bool(drafts.tokens) and agreed == len(ahead.context) and len(tokens) > agreed
                 and tokens[agreed] == drafts.tokens[0])
    if not came_true:
        return None, min(held, agreed)
    rest = slice(1, 1 + plan.levels)
    proposal = Proposal(drafts.tokens[rest], drafts.draft_top_k[rest]) if plan.levels and not plan.tree else None
    return (proposal if proposal is not None and proposal.tokens else None), min(held, agreed + 1)
