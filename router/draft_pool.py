"""Speculation from a separate drafter: a pool of draft services, one batched `Propose` per replica per step.

Each sequence is pinned to one draft replica, which keeps it as a session: a call carries the tokens committed
since the drafter last saw it and the length to roll back to. The drafter also feeds itself its own drafts, so
after a step it holds the committed tokens plus those drafts; only the accepted ones stay valid (`settle`).

A draft replica that fails or is slow costs speculation, not requests: its sequences get no drafts this step
(the step runs them at depth 0) and it is skipped for ``retry_s``; one that left the pool since the step began
(its channel closed) is skipped quietly, its sequences already moved to another.

With ``prefill_alongside`` (DuoDecoding), a sequence's first step does not wait for a drafter that keeps a KV cache
to compute its prompt: the step verifies no drafts for it and sends the prompt to its drafter in a call of its own,
which runs while the target computes the prompt too; the sequence drafts from the first step after that call has
answered. Its first token then comes after the slower of the two prefills instead of after both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from router.live_request import DRAFT_POOL, LiveRequest
from router.replicas import DraftReplica, ReplicaError, ReplicaGone, release_on
from specfleet.otel import RouterMetrics
from specfleet.speculation import (
    PREFILL_TOKENS,
    DraftAsk,
    DraftPlan,
    Proposal,
    Proposals,
    SessionDelta,
    SessionReply,
    StepPlan,
    Verdict,
)

log = logging.getLogger("specfleet.router")


@dataclass(frozen=True)
class DraftCall:
    """One sequence's entry in a call to its drafter: draft ``plan`` after ``context``, of which the drafter holds
    the first ``held`` tokens (the call rolls it back to them and sends the rest)."""

    seq: LiveRequest
    context: list[int]
    held: int
    plan: DraftPlan


class DraftPool:
    def __init__(self, timeout_ms: float, retry_s: float, metrics: RouterMetrics, name: str = DRAFT_POOL,
                 prefill_alongside: bool = False) -> None:
        """``name``: the pool's, whose session of each sequence (`LiveRequest.sessions`) it drafts and releases;
        ``prefill_alongside``: see the module's doc."""
        self.name = name
        self.timeout_ms = timeout_ms
        self.retry_s = retry_s
        self.metrics = metrics
        # By seq_id, for the step under way: the tokens the drafter holds after its call, and where the drafts began.
        self._drafted: dict[str, tuple[int, int]] = {}
        self.prefill_alongside = prefill_alongside
        # By seq_id, the calls in which drafters compute prompts beside the target, until they answer.
        self._prefilling: dict[str, asyncio.Task[tuple[Proposals, dict[str, int]]]] = {}

    def room(self, seq: LiveRequest) -> int | None:
        session = seq.sessions.get(self.name)
        draft = None if session is None else session.replica
        if draft is None or not draft.available or self._prefills_alongside(seq):
            return 0
        if draft.info is not None and draft.info.max_seq_len:
            return max(0, draft.info.max_seq_len - len(seq.tokens))
        return None

    async def propose(self, batch: list[LiveRequest], plan: StepPlan) -> Proposals:
        calls = [DraftCall(seq, seq.tokens, seq.draft_cached, plan.draft(seq.seq_id)) for seq in batch
                 if plan.draft(seq.seq_id).levels > 0]
        proposals, cached_len = await self.draft(calls)
        self._drafted = {seq_id: (held, len(seq.tokens)) for seq in batch
                         if (held := cached_len.get(seq_id := seq.seq_id)) is not None}
        self.start_prefills(batch, plan)
        return proposals

    def start_prefills(self, batch: list[LiveRequest], plan: StepPlan) -> None:
        """With ``prefill_alongside``: sends the prompts of the batch's starting sequences that draft nothing this
        step to their drafters, in one call per replica that is not awaited (it runs while the target verifies);
        not those the plan says will not catch up (`StepPlan.no_catch_up`)."""
        if not self.prefill_alongside:
            return
        # A request of two tokens or fewer has no step left to draft in after this one.
        calls = [DraftCall(seq, seq.tokens, seq.draft_cached, DraftPlan(0)) for seq in batch
                 if plan.draft(seq.seq_id).levels == 0 and _needs_prefill(seq, self.name)
                 and seq.max_new_tokens > 2 and seq.seq_id not in self._prefilling
                 and seq.seq_id not in plan.no_catch_up]
        if not calls:
            return
        task = asyncio.get_running_loop().create_task(self.draft(calls))
        for call in calls:
            self._prefilling[call.seq.seq_id] = task
        task.add_done_callback(functools.partial(self._prefilled, [(c.seq, c.seq.draft) for c in calls]))

    def _prefilled(self, asked: list[tuple[LiveRequest, DraftReplica]],
                   task: asyncio.Task[tuple[Proposals, dict[str, int]]]) -> None:
        """When the drafters answer the prompts sent alongside (each sequence with the replica asked): each now holds
        what it says it holds (nothing, when the call failed: the sequence's next call sends the prompt again)."""
        failed = task.cancelled() or task.exception() is not None
        if failed and not task.cancelled():
            log.warning("computing prompts on their drafters failed: %r", task.exception())
        held = {} if failed else task.result()[1]
        for seq, draft in asked:
            self._prefilling.pop(seq.seq_id, None)
            session = seq.sessions.get(self.name)
            # One moved to another replica since is started there afresh.
            if seq.seq_id in held and session is not None and session.replica is draft:
                session.cached = min(held[seq.seq_id], len(seq.tokens))

    def _prefills_alongside(self, seq: LiveRequest) -> bool:
        """Whether ``seq`` drafts nothing now because its drafter computes (or is about to compute) its prompt."""
        return self.prefill_alongside and (seq.seq_id in self._prefilling or _needs_prefill(seq, self.name))

    async def draft(self, calls: list[DraftCall]) -> tuple[Proposals, dict[str, int]]:
        """One batched `Propose` per replica for ``calls``, in parallel: the proposals, and the tokens of each
        call's context the drafter now holds (its drafts fed back to it included)."""
        groups: dict[str, list[DraftCall]] = {}
        for call in calls:
            groups.setdefault(call.seq.draft.address, []).append(call)
        if len(groups) == 1:  # the usual case: one replica, called without a task of its own
            (group,) = groups.values()
            replies = [await self._propose_on(group[0].seq.draft, group)]
        else:
            replies = await asyncio.gather(*(self._propose_on(g[0].seq.draft, g) for g in groups.values()))
        return (Proposals({seq_id: p for reply in replies for seq_id, p in reply.answers.items()},
                          max((reply.compute_ms for reply in replies), default=0.0)),
                {seq_id: n for reply in replies for seq_id, n in reply.cached_len.items()})

    def settle(self, batch: list[LiveRequest], verdicts: Mapping[str, Verdict]) -> None:
        keep_accepted(batch, self._drafted, verdicts)
        self._drafted = {}

    async def release(self, seqs: list[LiveRequest]) -> None:
        """Unpins finished sequences from their drafts in this pool (which then take new ones first) and frees them
        there."""
        # A prompt still being computed would bring the sequence back on its drafter: let it answer first.
        pending = {task for seq in seqs if (task := self._prefilling.pop(seq.seq_id, None)) is not None}
        await asyncio.gather(*pending, return_exceptions=True)
        pinned = [(s.seq_id, session.replica) for s in seqs
                  if (session := s.sessions.get(self.name)) is not None and session.replica is not None]
        drafts = {draft.address: draft for _, draft in pinned}
        for _, draft in pinned:
            draft.assigned -= 1
        await asyncio.gather(*(release_on(d.link, [seq_id for seq_id, draft in pinned if draft is d])
                               for d in drafts.values()))

    async def _propose_on(self, draft: DraftReplica, calls: list[DraftCall]) -> SessionReply[Proposal]:
        try:
            reply = await self._call(draft, calls)
            # Only those still pinned here and still running: a sequence moved off a draft that left is prefilled by
            # its new one, and a finished one must not be brought back to life by its resend.
            resend = [dataclasses.replace(c, held=0) for c in calls
                      if c.seq.seq_id in reply.unknown and c.seq.draft is draft and not c.seq.finished]
            if resend:  # the drafter lost them (restart, eviction): send the whole context once
                self.metrics.record_reprefills("draft", len(resend))
                for call in resend:
                    call.seq.draft_cached = 0
                more = await self._call(draft, resend)
                reply.answers.update(more.answers)
                reply.cached_len.update(more.cached_len)
                reply.compute_ms += more.compute_ms
        except ReplicaGone as err:
            log.info("draft %s left during a step (%s): this step runs without its drafts", draft.address, err)
            return SessionReply({}, {}, [], 0.0)
        except ReplicaError as err:
            # draft_cached stays: whether or not the call got through, the drafter holds at least that many
            # tokens (or reports the sequence unknown), and the next call rolls back to it. Resetting it would
            # turn one slow call into a full re-prefill, slower still, on every retry.
            draft.mark_failed(str(err), self.retry_s)
            return SessionReply({}, {}, [], 0.0)
        draft.mark_ok()
        return reply

    async def _call(self, draft: DraftReplica, calls: list[DraftCall]) -> SessionReply[Proposal]:
        asks = [DraftAsk(SessionDelta(c.seq.seq_id, c.held, c.context[c.held:]), c.plan, c.seq.sampling, c.seq.seed)
                for c in calls]
        # A call that prefills a prompt is legitimately slower than a step: its timeout grows with the longest
        # prompt it carries. Otherwise a long prompt would time out on every retry and never be drafted for.
        longest = max(len(a.delta.new_tokens) for a in asks)
        timeout_s = self.timeout_ms / 1000 * max(1.0, longest / PREFILL_TOKENS)
        sent = time.perf_counter()
        reply = await draft.link.propose(asks, timeout_s)
        self.metrics.record_draft_rtt(draft.address, time.perf_counter() - sent)
        return reply


def _needs_prefill(seq: LiveRequest, pool: str) -> bool:
    """Whether ``seq`` starts now (the target computes its prompt in this step) on a drafter of ``pool`` that keeps a
    KV cache (``num_slots``) and holds none of it yet. A drafter without one (prompt lookup) drafts from the first
    step."""
    session = seq.sessions.get(pool)
    draft = None if session is None else session.replica
    return (seq.target_cached == 0 and session is not None and session.cached == 0 and draft is not None
            and draft.info is not None and draft.info.num_slots > 0)


def keep_accepted(batch: list[LiveRequest], drafted: Mapping[str, tuple[int, int]], verdicts: Mapping[str, Verdict]
                  ) -> None:
    """Each drafted sequence's drafter session, once its verdict is in: of the tokens it held after its call
    (``drafted``: that count and where the drafts began, by seq_id), those committed stay valid."""
    for seq in batch:
        held = drafted.get(seq.seq_id)
        verdict = verdicts.get(seq.seq_id)
        if held is not None and verdict is not None:
            cached_len, position = held
            seq.draft_cached = min(cached_len, position + verdict.accepted)
