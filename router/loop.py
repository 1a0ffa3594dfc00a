"""The step loop: one per target replica, batching every live sequence on it.

Each step reads like the method: choose depths (or tree shapes) -> propose (one batched call per draft
replica) -> verify (one batched call to the target) -> commit and emit -> record -> retire finished
sequences.
Requests join and leave between steps (continuous batching).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from router.policy_feed import PolicyFeed
from router.prediction_audit import Calibration, PredictionAudit
from router.replicas import DraftReplica, TargetReplica
from router.sequence import Sequence, fail
from specfleet.config import RouterConfig
from specfleet.otel import RouterMetrics
from specfleet.policy import DepthDecision, TreeDecision, TreePlan
from specfleet.protos import draft_pb2, session_pb2, target_pb2
from specfleet.telemetry import PREFILL_TOKENS, StepRecord, TelemetryWriter, is_prefill
from specfleet.trees.shapes import TreeShape, chain_shape, count_tries
from specfleet.wire import sampling_to_proto, tree_shape_to_proto

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("specfleet.router")

OK, UNKNOWN = session_pb2.ENTRY_STATUS_OK, session_pb2.ENTRY_STATUS_UNKNOWN_SEQUENCE


@dataclass
class StepPlan:
    """What each sequence drafts this step: a chain of ``depths[seq_id]`` tokens, or (listed in
    ``trees``) a tree of that shape with at most ``max_nodes[seq_id]`` nodes and depth levels."""

    depths: dict[str, int]
    reason: str
    trees: dict[str, TreeShape] = field(default_factory=dict)
    max_nodes: dict[str, int] = field(default_factory=dict)
    predicted_ms: float = 0.0  # the policy's prediction of the step's time (0: none)
    predicted_tokens: float = 0.0  # and of the tokens it emits, all sequences

    def planned(self, batch: list[Sequence]) -> list[int]:
        """Draft tokens planned per sequence (a tree's node budget), for the step's record."""
        return [self.max_nodes.get(s.seq_id, self.depths[s.seq_id]) for s in batch]


def predictions(decision: DepthDecision | TreeDecision) -> dict[str, float]:
    """A decision's predicted step time and tokens emitted, as `StepPlan` keeps them for the audit."""
    return {"predicted_ms": decision.step_ms, "predicted_tokens": decision.goodput * decision.step_ms / 1000.0}


class StepLoop:
    """Drives the sequences pinned to one target replica."""

    DECISION_LOG_INTERVAL_S = 5.0

    def __init__(self, target: TargetReplica, config: RouterConfig, feed: PolicyFeed,
                 telemetry: TelemetryWriter | None = None, metrics: RouterMetrics | None = None) -> None:
        assert target.info is not None
        self.target = target
        self.config = config
        self.feed = feed
        self.telemetry = telemetry
        self.metrics = metrics or RouterMetrics()
        self._last_decision_log = 0.0
        self.audit = PredictionAudit()
        # With --calibration-half-life 0 the policy takes its predictions as they are.
        self.calibration = Calibration(config.calibration_half_life) if config.calibration_half_life else None
        self.capacity = target.info.num_slots
        self.max_context = target.info.max_seq_len
        self.live: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self._wakeup = asyncio.Event()
        self._background: set[asyncio.Task] = set()

    @property
    def load(self) -> int:
        return len(self.live) + len(self.waiting)

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._wakeup.set()

    def drain(self) -> list[Sequence]:
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
            except Exception as err:  # a bug must not strand every request on this replica
                log.exception("step failed on %s", self.target.address)
                for seq in self.live:
                    fail(seq, grpc.StatusCode.INTERNAL, f"router step failed: {err}")
            self._retire()

    async def step(self, batch: list[Sequence]) -> None:
        if not batch:
            return
        started = time.perf_counter()
        with self.metrics.step_span(self.target.address, (seq.span for seq in batch)) as span:
            plan = self.choose(batch)
            # Read before the step moves the caches on; only for steps the audit will count.
            prefills = plan.predicted_ms > 0 and any(is_prefill(s.tokens[s.target_cached:]) or (
                plan.depths[s.seq_id] > 0 and is_prefill(s.tokens[s.draft_cached:])) for s in batch)
            proposals, draft_ms = await self.propose(batch, plan)
            verdicts, verify_ms = await self.verify(batch, proposals)
            record = StepRecord(len(batch), plan.planned(batch))
            deepest = max(plan.depths.values())
            now = time.perf_counter()
            for seq in batch:
                verdict = verdicts.get(seq.seq_id)
                if verdict is not None and not seq.finished:
                    self.commit(seq, plan.depths[seq.seq_id], proposals.get(seq.seq_id), verdict, plan.reason,
                                record, now)
            record.duration_s = time.perf_counter() - started
            if plan.predicted_ms > 0:
                measured_ms = record.duration_s * 1000
                self.audit.add(deepest > 0, plan.predicted_ms, measured_ms, plan.predicted_tokens, record.emitted,
                               prefilled=prefills)
                if self.calibration is not None and not prefills:
                    self.calibration.add(len(batch), deepest > 0, plan.predicted_ms, measured_ms,
                                         plan.predicted_tokens, record.emitted)
            self.record(record, span, deepest, draft_ms, verify_ms)

    def record(self, record: StepRecord, span: Span, deepest: int, draft_ms: float, verify_ms: float) -> None:
        """Hands the step's numbers to the exporters: Redis telemetry (for the depth policy) and OpenTelemetry.
        ``deepest``: the largest depth (tree levels) the step asked for."""
        if self.telemetry is not None:
            # What the services do not see: gRPC, (de)serialisation and this loop's own bookkeeping. A step that
            # calls the drafters pays one more round trip, so it goes under its depth (1 + depth, as Verify's).
            overhead_ms = record.duration_s * 1000 - draft_ms - verify_ms
            self.telemetry.record_latency(record.batch_size, 1.0 + deepest, max(0.0, overhead_ms), role="overhead")
            if not record.acceptance.empty():
                self.telemetry.record_acceptance(record.acceptance)
        self.metrics.annotate_step(span, record)
        # The instruments cost microseconds per sequence: on the event loop's next turn they run while the next step
        # waits for its Propose/Verify calls, not inside this step.
        asyncio.get_running_loop().call_soon(self.metrics.record_step, record)

    def choose(self, batch: list[Sequence]) -> StepPlan:
        """The policy's depths, or with --tree the tree shapes, within the room each sequence has left."""
        counts = [(s.stats.first_accepted, s.stats.rejections) for s in batch]
        offers = [(s.stats.offers, s.stats.misses) for s in batch]
        shape = self.config.tree_shape
        calibration = 1.0 if self.calibration is None else self.calibration.factor(len(batch))
        if shape is None:
            decision = self.feed.policy.choose(counts, [self.depth_room(s) for s in batch], offers, calibration)
            plan = StepPlan({s.seq_id: d for s, d in zip(batch, decision.depths, strict=True)}, decision.reason,
                            **predictions(decision))
        else:
            plan = self.choose_trees(batch, counts, offers, shape, calibration)
        self._log_decision(len(batch), plan.reason)
        return plan

    def choose_trees(self, batch: list[Sequence], counts: list[tuple[int, int]], offers: list[tuple[int, int]],
                     shape: TreeShape, calibration: float = 1.0) -> StepPlan:
        """With --depth K the configured shape cut to K levels and --max-tree-nodes; with --depth auto the
        best of plain decoding, chains and the shape at every node budget, by the policy's cost model."""
        rooms = [(self.node_room(s), self.depth_room(s)) for s in batch]
        pinned = self.config.pinned_depth
        if pinned is not None:
            shapes = [shape.fit(self.config.max_tree_nodes, pinned)]
        else:
            shapes = [None, *(chain_shape(d) for d in range(1, self.config.max_depth + 1))]
            for budget in range(2, self.config.max_tree_nodes + 1):
                fitted = shape.fit(budget, self.config.max_depth)
                if fitted is not None and not fitted.is_chain and fitted not in shapes:
                    shapes.append(fitted)
        # Each candidate, fitted to each sequence's room.
        per_seq = [[None if c is None else c.fit(*room) for room in rooms] for c in shapes]
        plan = StepPlan({}, f"pinned tree {shapes[0].describe() if shapes[0] else 'none'}")
        if len(shapes) > 1:
            plans = [[TreePlan(0, ()) if f is None else TreePlan(f.nodes, f.level_tries()) for f in fitted]
                     for fitted in per_seq]
            siblings = [(s.stats.sibling_accepted, s.stats.sibling_rejected) for s in batch]
            decision = self.feed.policy.choose_tree(counts, plans, offers, calibration, siblings)
            per_seq = [per_seq[decision.index]]
            plan = StepPlan({}, decision.reason, **predictions(decision))
        for seq, fitted in zip(batch, per_seq[0], strict=True):
            plan.depths[seq.seq_id] = 0 if fitted is None else fitted.levels
            if fitted is not None and not fitted.is_chain:  # a chain stays a chain on the wire
                plan.trees[seq.seq_id] = fitted
                plan.max_nodes[seq.seq_id] = fitted.nodes
        return plan

    def _log_decision(self, batch_size: int, reason: str) -> None:
        summary = f"batch {batch_size}: {reason}"
        self.feed.record_decision(summary)
        now = time.monotonic()
        if now - self._last_decision_log > self.DECISION_LOG_INTERVAL_S:
            audit = self.audit.report()
            log.info("depth policy on %s, %s%s", self.target.address, summary,
                     f" (since the last line: {audit})" if audit else "")
            self._last_decision_log = now
        else:
            log.debug("depth policy on %s, %s", self.target.address, summary)

    def depth_room(self, seq: Sequence) -> int:
        """Most draft tokens ``seq`` can use: what its request and both caches still have room for."""
        if seq.draft is None or not seq.draft.available:
            return 0
        limits = [self.config.max_depth, seq.max_new_tokens - len(seq.generated) - 1,
                  self.max_context - len(seq.tokens)]
        if seq.draft.info is not None and seq.draft.info.max_seq_len:
            limits.append(seq.draft.info.max_seq_len - len(seq.tokens))
        return max(0, min(limits))

    def node_room(self, seq: Sequence) -> int:
        """Most tree nodes ``seq`` can use: the budget, and what both caches can hold after its tokens."""
        if seq.draft is None or not seq.draft.available:
            return 0
        limits = [self.config.max_tree_nodes, self.max_context - len(seq.tokens)]
        if seq.draft.info is not None and seq.draft.info.max_seq_len:
            limits.append(seq.draft.info.max_seq_len - len(seq.tokens))
        return max(0, min(limits))

    # -- propose --------------------------------------------------------------------------------

    async def propose(self, batch: list[Sequence], plan: StepPlan) -> tuple[dict[str, draft_pb2.Proposal], float]:
        """Proposals by seq_id (one batched call per draft replica, in parallel) and the drafters'
        compute time (the slowest replica's)."""
        groups: dict[str, list[Sequence]] = {}
        for seq in batch:
            if plan.depths[seq.seq_id] > 0:
                groups.setdefault(seq.draft.address, []).append(seq)
        results = await asyncio.gather(*(self._propose_on(seqs[0].draft, seqs, plan) for seqs in groups.values()))
        proposals = {seq_id: p for result, _ in results for seq_id, p in result.items()}
        return proposals, max((ms for _, ms in results), default=0.0)

    async def _propose_on(self, draft: DraftReplica, seqs: list[Sequence], plan: StepPlan
                          ) -> tuple[dict[str, draft_pb2.Proposal], float]:
        try:
            out, compute_ms = await self._propose_call(draft, seqs, plan)
            # Only those still pinned here: a sequence moved off a draft that left is prefilled by its new one.
            resend = [s for s in seqs if out[s.seq_id].status == UNKNOWN and s.draft is draft]
            if resend:  # the drafter lost them (restart, eviction): send the whole context once
                self.metrics.record_reprefills("draft", len(resend))
                for seq in resend:
                    seq.draft_cached = 0
                more, more_ms = await self._propose_call(draft, resend, plan)
                out.update(more)
                compute_ms += more_ms
        except grpc.aio.UsageError as err:  # its channel closed: the draft left the pool since this step began
            log.info("draft %s left during a step (%s): this step runs without its drafts", draft.address, err)
            return {}, 0.0
        except grpc.aio.AioRpcError as err:
            # draft_cached stays: whether or not the call got through, the drafter holds at least that many
            # tokens (or reports the sequence unknown), and the next call rolls back to it. Resetting it would
            # turn one slow call into a full re-prefill, slower still, on every retry.
            draft.mark_failed(f"{err.code().name}: {err.details()}", self.config.draft_retry_s)
            return {}, 0.0
        draft.mark_ok()
        return {seq_id: p for seq_id, p in out.items() if p.status == OK}, compute_ms

    async def _propose_call(self, draft: DraftReplica, seqs: list[Sequence], plan: StepPlan
                            ) -> tuple[dict[str, draft_pb2.Proposal], float]:
        request = draft_pb2.ProposeRequest(entries=[
            draft_pb2.ProposeEntry(
                sequence=session_pb2.SequenceDelta(seq_id=s.seq_id, rollback_to=s.draft_cached,
                                                   new_tokens=s.tokens[s.draft_cached:]),
                depth=plan.depths[s.seq_id], sampling=sampling_to_proto(s.sampling), seed=s.seed,
                tree=(tree_shape_to_proto(plan.trees[s.seq_id], plan.max_nodes[s.seq_id])
                      if s.seq_id in plan.trees else None))
            for s in seqs])
        # A call that prefills a prompt is legitimately slower than a step: its timeout grows with the longest
        # prompt it carries. Otherwise a long prompt would time out on every retry and never be drafted for.
        longest = max(len(e.sequence.new_tokens) for e in request.entries)
        timeout_ms = self.config.draft_timeout_ms * max(1.0, longest / PREFILL_TOKENS)
        sent = time.perf_counter()
        response = await draft.stub.Propose(request, timeout=timeout_ms / 1000)
        self.metrics.record_draft_rtt(draft.address, time.perf_counter() - sent)
        return {p.seq_id: p for p in response.proposals}, response.compute_ms

    # -- verify ---------------------------------------------------------------------------------

    async def verify(self, batch: list[Sequence], proposals: dict[str, draft_pb2.Proposal]
                     ) -> tuple[dict[str, target_pb2.Verdict], float]:
        """Verdicts by seq_id (one batched call) and the target's compute time."""
        try:
            out, compute_ms = await self._verify_call(batch, proposals)
            resend = [s for s in batch if out[s.seq_id].status == UNKNOWN]
            if resend:
                log.info("target %s lost %d sequence(s); re-prefilling them", self.target.address, len(resend))
                self.metrics.record_reprefills("target", len(resend))
                for seq in resend:
                    seq.target_cached = 0
                more, more_ms = await self._verify_call(resend, proposals)
                out.update(more)
                compute_ms += more_ms
        except grpc.aio.AioRpcError as err:
            log.error("verify on %s failed: %s %s", self.target.address, err.code().name, err.details())
            for seq in batch:
                fail(seq, grpc.StatusCode.UNAVAILABLE, f"target {self.target.address} failed: {err.details()}")
            return {}, 0.0
        return {seq_id: v for seq_id, v in out.items() if v.status == OK}, compute_ms

    async def _verify_call(self, seqs: list[Sequence], proposals: dict[str, draft_pb2.Proposal]
                           ) -> tuple[dict[str, target_pb2.Verdict], float]:
        entries = []
        for s in seqs:
            proposal = proposals.get(s.seq_id)
            entries.append(target_pb2.VerifyEntry(
                sequence=session_pb2.SequenceDelta(seq_id=s.seq_id, rollback_to=s.target_cached,
                                                   new_tokens=s.tokens[s.target_cached:]),
                draft_tokens=proposal.tokens if proposal else [],
                draft_top_k=proposal.draft_top_k if proposal else [],
                draft_parents=proposal.parents if proposal else [],
                sampling=sampling_to_proto(s.sampling), seed=s.seed))
        sent = time.perf_counter()
        response = await self.target.stub.Verify(target_pb2.VerifyRequest(entries=entries),
                                                 timeout=self.config.verify_timeout_ms / 1000)
        self.metrics.record_verify_rtt(self.target.address, time.perf_counter() - sent)
        return {v.seq_id: v for v in response.verdicts}, response.compute_ms

    # -- commit, admit, retire ------------------------------------------------------------------

    def commit(self, seq: Sequence, requested: int, proposal: draft_pb2.Proposal | None, verdict: target_pb2.Verdict,
               reason: str, record: StepRecord, now: float) -> None:
        """Takes the step's tokens for ``seq``, which asked its drafter for ``requested`` levels."""
        position = len(seq.tokens)
        seq.target_cached = verdict.cached_len
        if proposal is not None:  # the drafter keeps its drafts; only the accepted ones stay valid
            seq.draft_cached = min(proposal.cached_len, position + verdict.accepted)
        drafted = len(proposal.tokens) if proposal else 0
        # A miss (asked, offered nothing: an n-gram drafter without a match) costs no verification and says nothing
        # of acceptance: the policy counts it in the offer rate. Otherwise, for the acceptance estimate: a chain
        # fails once if it ends before the depth asked for, rejected or cut short by a drafter with nothing more to
        # offer: the next position asked for emitted no draft token; a tree counts its rejected first tries the
        # same way and its later siblings apart (they are accepted less often).
        missed = requested > 0 and drafted == 0
        tries = None
        if missed:
            rejections = 0
        elif proposal and proposal.parents:
            tries = count_tries(proposal.parents, verdict.accepted_nodes)
            rejections = tries.first_rejected
            seq.stats.sibling_accepted += tries.later_siblings_accepted
            seq.stats.sibling_tried += tries.later_siblings_tried
        else:
            rejections = int(verdict.accepted < requested)
        kept = seq.commit(list(verdict.tokens), self.max_context)
        seq.stats.steps += 1
        seq.stats.drafted += drafted
        seq.stats.accepted += verdict.accepted
        seq.stats.rejections += rejections
        seq.stats.offers += int(drafted > 0)
        seq.stats.misses += int(missed)
        seq.stats.emitted += len(kept)
        seq.stats.depth = drafted
        seq.stats.depth_reason = reason
        seq.emit(kept)
        record.add_sequence(drafted, verdict.accepted, len(kept), rejections, asked=requested > 0, tries=tries)
        if kept:
            if not seq.first_token_at:
                seq.first_token_at = now
                record.first_token_s.append(now - seq.admitted_at)
            seq.last_token_at = now

    def _admit(self) -> None:
        while self.waiting and len(self.live) < self.capacity:
            seq = self.waiting.popleft()
            if not seq.finished:
                self.live.append(seq)

    def _retire(self) -> None:
        done = [s for s in self.live if s.finished]
        if not done:
            return
        self.live = [s for s in self.live if not s.finished]
        for seq in done:
            if seq.draft is not None:
                seq.draft.assigned -= 1
        self._spawn(self._release(done))

    async def _release(self, seqs: list[Sequence]) -> None:
        releases = [(self.target.stub, [s.seq_id for s in seqs])]
        drafts = {s.draft.address: s.draft for s in seqs if s.draft is not None}
        for draft in drafts.values():
            releases.append((draft.stub, [s.seq_id for s in seqs if s.draft is draft]))
        await asyncio.gather(*(_release_on(stub, ids) for stub, ids in releases))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _release_on(stub, seq_ids: list[str]) -> None:
    """Frees ``seq_ids`` on one replica; one that fails or has left evicts them later by itself."""
    try:
        await stub.Release(session_pb2.ReleaseSequencesRequest(seq_ids=seq_ids), timeout=10)
    except (grpc.aio.AioRpcError, grpc.aio.UsageError) as err:
        log.warning("release failed (the replica will evict the sequence later): %s", err)
