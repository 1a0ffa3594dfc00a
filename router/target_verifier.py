"""The `Verifier` port over one target service: sessions, re-prefills and failures around its `Verify` call.

The target keeps each sequence's KV cache between calls, so a call carries only the tokens committed since the
target last saw the sequence and the length to roll back to (its rejected drafts). A target that lost a
sequence (restarted, evicted) says so, and the sequence is sent again whole in a second call of the same step:
a re-prefill, never a wrong token. A target that does not answer at all raises `TargetLost`: nothing of the step is
committed, and the fleet moves its sequences to the other targets, which re-prefill them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import grpc

from router.live_request import LiveRequest
from router.replicas import ReplicaError, TargetLost, TargetReplica, release_on
from specfleet.otel import RouterMetrics
from specfleet.speculation import Proposal, SessionDelta, SessionReply, Verdict, Verdicts, VerifyAsk

log = logging.getLogger("specfleet.router")

# How a target that is down (or draining, or stuck) answers; any other failure is the request's or the target's bug.
UNANSWERED = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
TOKENS_PER_TIMEOUT = 4096
"""Tokens a Verify may carry within one --verify-timeout-ms; a call carrying more (prompts being prefilled) gets
that timeout once per this many tokens. A batch of long prompts is legitimately slow to prefill (eight of 4K tokens
took over a minute on a 2-core CPU), and a fixed deadline would take it for a dead target, move the sequences and
prefill them again, forever; a target that prefills slower than this many tokens per timeout is not serving."""


class TargetVerifier:
    def __init__(self, target: TargetReplica, timeout_s: float, metrics: RouterMetrics,
                 on_draining: Callable[[str], None] | None = None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.on_draining = on_draining  # told once, when the target first says it is shutting down

    async def verify(self, batch: list[LiveRequest], proposals: Mapping[str, Proposal]) -> Verdicts:
        try:
            reply = await self._call(batch, proposals)
            resend = [s for s in batch if s.seq_id in reply.unknown]
            if resend:
                log.info("target %s lost %d sequence(s); re-prefilling them", self.target.address, len(resend))
                self.metrics.record_reprefills("target", len(resend))
                for seq in resend:
                    seq.target_cached = 0
                more = await self._call(resend, proposals)
                reply.answers.update(more.answers)
                reply.cached_len.update(more.cached_len)
                reply.compute_ms += more.compute_ms
        except ReplicaError as err:
            if err.code in UNANSWERED:
                raise TargetLost(self.target.address, err) from err
            log.error("verify on %s failed: %s", self.target.address, err)
            for seq in batch:
                seq.fail(grpc.StatusCode.UNAVAILABLE, f"target {self.target.address} failed: {err.details}")
            return Verdicts()
        for seq in batch:
            if seq.seq_id in reply.cached_len:
                seq.target_cached = reply.cached_len[seq.seq_id]
        if reply.draining and not self.target.draining:
            self.target.draining = True
            if self.on_draining is not None:
                self.on_draining(self.target.address)
        return Verdicts(reply.answers, reply.compute_ms)

    async def _call(self, seqs: list[LiveRequest], proposals: Mapping[str, Proposal]) -> SessionReply[Verdict]:
        asks = [VerifyAsk(SessionDelta(s.seq_id, s.target_cached, s.tokens[s.target_cached:]), proposals.get(s.seq_id),
                          s.sampling, s.seed) for s in seqs]
        carried = sum(len(a.delta.new_tokens) + (len(a.proposal.tokens) if a.proposal else 0) for a in asks)
        sent = time.perf_counter()
        reply = await self.target.link.verify(asks, self.timeout_s * max(1.0, carried / TOKENS_PER_TIMEOUT))
        self.metrics.record_verify_rtt(self.target.address, time.perf_counter() - sent)
        return reply

    async def release(self, seq_ids: list[str]) -> None:
        await release_on(self.target.link, seq_ids)

