"""One live request as the router sees it: its tokens, where its state lives, and its stream."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from router.text import IncrementalDetokenizer, StopMatcher
from specfleet.protos import generate_pb2
from specfleet.sampling_params import SamplingParams

FinishReason = int  # a generate_pb2.FinishReason value


@dataclass
class SpeculationStats:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # rejected first tries: for a chain, steps in which a draft was rejected (alpha needs them)
    sibling_accepted: int = 0  # a tree's later siblings accepted (among `accepted`) and tried, for their own rate
    sibling_tried: int = 0
    offers: int = 0  # steps in which the drafter offered drafts
    misses: int = 0  # steps in which drafts were asked for and none came (the offer-rate estimator needs both)
    emitted: int = 0
    depth: int = 0
    depth_reason: str = ""

    @property
    def first_accepted(self) -> int:
        """Accepted drafts that were the first child tried at their node (every accepted draft of a chain)."""
        return self.accepted - self.sibling_accepted

    @property
    def sibling_rejected(self) -> int:
        return self.sibling_tried - self.sibling_accepted

    def to_proto(self) -> generate_pb2.SpeculationStats:
        return generate_pb2.SpeculationStats(
            steps=self.steps, drafted_tokens=self.drafted, accepted_tokens=self.accepted,
            acceptance_rate=self.accepted / self.drafted if self.drafted else 0.0,
            mean_tokens_per_step=self.emitted / self.steps if self.steps else 0.0, depth=self.depth,
            depth_reason=self.depth_reason)


@dataclass
class Sequence:
    """A request being generated. The step loop owns it; the RPC handler reads ``outbox``."""

    request_id: str
    seq_id: str
    tokens: list[int]  # prompt + committed generated tokens
    prompt_len: int
    sampling: SamplingParams
    seed: int
    max_new_tokens: int
    eos_ids: frozenset[int]
    ignore_eos: bool
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    # How many leading tokens of ``tokens`` each service holds in its cache (0: send everything).
    target_cached: int = 0
    draft_cached: int = 0
    draft: Any = None  # the DraftReplica this sequence is pinned to, if any
    finish_reason: FinishReason = generate_pb2.FINISH_REASON_UNSPECIFIED
    cancelled: bool = False  # the client went away: stop quietly
    error: StreamError | None = None  # what failed it, if something did
    outbox: asyncio.Queue[generate_pb2.GenerateResponse] = field(default_factory=asyncio.Queue)
    # For the metrics and traces: when it was admitted and got its first and latest tokens (perf_counter), its span.
    admitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    span: Any = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def finished(self) -> bool:
        return self.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED or self.cancelled

    def commit(self, new_tokens: list[int], max_context: int) -> list[int]:
        """Appends the step's tokens up to the first stop condition; returns those kept."""
        kept: list[int] = []
        for token in new_tokens:
            self.tokens.append(token)
            kept.append(token)
            if token in self.eos_ids and not self.ignore_eos:
                self.finish_reason = generate_pb2.FINISH_REASON_EOS
                break
            if len(self.generated) >= self.max_new_tokens or len(self.tokens) >= max_context:
                self.finish_reason = generate_pb2.FINISH_REASON_LENGTH
                break
        return kept

    def emit(self, new_tokens: list[int]) -> None:
        """Queues one stream message for the tokens just committed (and the end, if reached)."""
        text, stopped = self.stops.feed(self.detokenizer.add(new_tokens))
        if stopped:
            self.finish_reason = generate_pb2.FINISH_REASON_STOP
        elif self.finished:
            text += self.stops.flush()
        self.outbox.put_nowait(generate_pb2.GenerateResponse(
            request_id=self.request_id, token_ids=new_tokens, text=text, finish_reason=self.finish_reason,
            stats=self.stats.to_proto(), prompt_tokens=self.prompt_len))

    def outcome(self, deadline_passed: bool = False) -> tuple[str, str]:
        """How the request ended, as the metrics label it: ok, error, aborted or deadline, and the gRPC status code's
        name. Asked when the RPC handler is done with it: if it has not finished, the client went away."""
        if self.error is not None:
            return "error", self.error.code.name
        if self.finish_reason == generate_pb2.FINISH_REASON_ABORTED:
            return "aborted", "OK"
        if self.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED:
            return "ok", "OK"
        return ("deadline", "DEADLINE_EXCEEDED") if deadline_passed else ("aborted", "CANCELLED")

    def time_per_output_token(self) -> float | None:
        generated = len(self.tokens) - self.prompt_len
        return (self.last_token_at - self.first_token_at) / (generated - 1) if generated > 1 else None

    def finish(self, reason: FinishReason) -> None:
        """Ends the stream early (abort) with a last, empty message."""
        self.finish_reason = reason
        self.outbox.put_nowait(generate_pb2.GenerateResponse(
            request_id=self.request_id, finish_reason=reason, stats=self.stats.to_proto(),
            prompt_tokens=self.prompt_len))


@dataclass(frozen=True)
class StreamError:
    """Queued instead of a message when a request cannot go on (e.g. its target is unreachable)."""

    code: Any  # grpc.StatusCode
    message: str


def fail(seq: Sequence, code: Any, message: str) -> None:
    seq.cancelled = True
    seq.error = StreamError(code, message)
    seq.outbox.put_nowait(seq.error)  # type: ignore[arg-type]
