"""The step loop: one per target replica, batching every live sequence on it.

A step reads like the method: choose a plan -> propose drafts (each sequence's strategy) -> verify them in one
batched pass -> commit the verdicts' tokens -> emit them to the clients -> let the strategies settle -> hand the
step's stats to the observers. Requests join and leave between steps (continuous batching). The loop sees its
ports (`router.ports`) and plain values only: no protobuf, no Redis, no model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from router.live_request import LiveRequest
from router.planner import Planner
from router.ports import Proposer, StepObserver, StepTracer, Verifier
from router.replicas import TargetLost
from specfleet.speculation import Proposals, StepPlan, Verdicts
from specfleet.stats import SequenceStep, StepStats

log = logging.getLogger("specfleet.router")


@dataclass(frozen=True)
class Committed:
    """One sequence's part of a step once its verdict is committed: the tokens it kept of the verdict's (fewer when
    a stop condition came first), and how its step went."""

    seq: LiveRequest
    kept: list[int]
    step: SequenceStep
    drafter: str | None = None  # the kind of drafter it drafted with, for the fleet's acceptance per kind


@dataclass(frozen=True)
class TokenLatencies:
    """How long the sequences that got tokens in a step waited for them: since admission for their first tokens,
    since their previous tokens for the others."""

    first_token_s: list[float]
    inter_token_s: list[float]


class StepLoop:
    """Drives the sequences pinned to one target replica."""

    def __init__(self, target: str, planner: Planner, proposer: Proposer, verifier: Verifier,
                 observers: Sequence[StepObserver], tracer: StepTracer, *, capacity: int, max_context: int) -> None:
        self.target = target
        self.planner = planner
        self.proposer = proposer
        self.verifier = verifier
        self.observers = list(observers)
        self.tracer = tracer
        self.capacity = capacity
        self.max_context = max_context
        self.live: list[LiveRequest] = []
        self.waiting: deque[LiveRequest] = deque()
        self._wakeup = asyncio.Event()
        self._background: set[asyncio.Task] = set()

    @property
    def load(self) -> int:
        return len(self.live) + len(self.waiting)

    def submit(self, seq: LiveRequest) -> None:
        self.waiting.append(seq)
        self._wakeup.set()

    def drain(self) -> list[LiveRequest]:
        """Takes every unfinished sequence off this loop, which must not be running (its target left): they keep
        their tokens and go on elsewhere."""
        self._retire()
        leaving = [*self.live, *(s for s in self.waiting if not s.finished)]
        self.live, self.waiting = [], deque()
        return leaving

    async def run(self) -> None:
        while True:
            self._admit()
            if not self.live:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self.step([s for s in self.live if not s.finished])
            except TargetLost:  # nothing was committed: the fleet moves the sequences to another target
                raise
            except Exception as err:  # a bug must not strand every request on this replica
                log.exception("step failed on %s", self.target)
                for seq in self.live:
                    seq.fail(grpc.StatusCode.INTERNAL, f"router step failed: {err}")
            self._retire()

    async def step(self, batch: list[LiveRequest]) -> None:
        if not batch:
            return
        started = time.perf_counter()
        with self.tracer.step_span(self.target, (seq.span for seq in batch)):
            plan = self.planner.plan(batch)
            proposals = await self.proposer.propose(batch, plan)
            verdicts = await self.verifier.verify(batch, proposals)
            committed = self.commit(batch, plan, proposals, verdicts)
            latencies = self.emit(committed)
            self.proposer.settle(batch, verdicts)
            self.observe(self.step_stats(batch, plan, proposals, verdicts, committed, latencies, started))

    def commit(self, batch: list[LiveRequest], plan: StepPlan, proposals: Proposals, verdicts: Verdicts
               ) -> list[Committed]:
        """Appends each verdict's tokens to its sequence, up to the sequence's first stop condition, and counts the
        step in the request's own stats (which its stream reports)."""
        committed = []
        for seq in batch:
            verdict = verdicts.get(seq.seq_id)
            if verdict is None or seq.finished:
                continue
            kept = seq.commit(verdict.tokens, self.max_context)
            step = SequenceStep.of(plan.draft(seq.seq_id).tokens, proposals.get(seq.seq_id), verdict, len(kept))
            seq.stats.observe(step, plan.reason, seq.strategy)
            committed.append(Committed(seq, kept, step, seq.drafter_kind))
        return committed

    def emit(self, committed: list[Committed]) -> TokenLatencies:
        """Streams each request's new tokens; returns how long each waited for them."""
        now = time.perf_counter()
        latencies = TokenLatencies([], [])
        for part in committed:
            part.seq.emit(part.kept)
            if part.kept:
                first = not part.seq.first_token_at
                waited = part.seq.mark_emitted(now)
                (latencies.first_token_s if first else latencies.inter_token_s).append(waited)
        return latencies

    def step_stats(self, batch: list[LiveRequest], plan: StepPlan, proposals: Proposals, verdicts: Verdicts,
                   committed: list[Committed], latencies: TokenLatencies, started: float) -> StepStats:
        stats = StepStats(self.target, len(batch), [plan.draft(s.seq_id).tokens for s in batch], plan.deepest,
                          proposals.compute_ms, verdicts.compute_ms, plan.predicted_ms, plan.predicted_tokens,
                          plan.prefills, plan.overlap, first_token_s=latencies.first_token_s,
                          inter_token_s=latencies.inter_token_s, reason=plan.reason)
        for part in committed:
            stats.observe(part.step, part.drafter)
        stats.duration_s = time.perf_counter() - started
        return stats

    def observe(self, stats: StepStats) -> None:
        for observer in self.observers:
            observer.observe(stats)

    def _admit(self) -> None:
        while self.waiting and len(self.live) < self.capacity:
            seq = self.waiting.popleft()
            if not seq.finished:
                seq.started_at = seq.started_at or time.perf_counter()
                self.live.append(seq)

    def _retire(self) -> None:
        done = [s for s in self.live if s.finished]
        if not done:
            return
        self.live = [s for s in self.live if not s.finished]
        self._spawn(self._release(done))

    async def _release(self, seqs: list[LiveRequest]) -> None:
        await asyncio.gather(self.verifier.release([s.seq_id for s in seqs]), self.proposer.release(seqs))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
