"""One live request as the router sees it: its tokens, where its state lives, and its stream.

The step loop owns a `LiveRequest` while it runs; the RPC handler reads its ``outbox``, where each step that
emitted tokens queues a `StreamChunk` (or a `StreamError` when the request cannot go on). Plain values: the
server turns them into protobuf messages.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from router.text import IncrementalDetokenizer, StopMatcher
from specfleet.config import DEFAULT_DRAFT_POOL
from specfleet.sampling_params import SamplingParams
from specfleet.stats import RequestStats, SpeculationSummary

DRAFT_POOL = DEFAULT_DRAFT_POOL
"""The strategy of a router given one draft pool: a separate drafter from that pool (`router.draft_pool`). A router
given several names each one's strategy after its pool."""


@dataclass
class DraftSession:
    """A request's session on one draft pool: the replica of the pool it is pinned to (None: none there), and how
    many leading tokens of the request that replica holds (0: send everything)."""

    replica: Any = None  # a router.replicas.DraftReplica
    cached: int = 0


class FinishReason(enum.Enum):
    """Why a request ended."""

    LENGTH = "length"  # max_new_tokens reached, or the model's context is full
    EOS = "eos"  # the model produced an end-of-sequence token
    STOP = "stop"  # a stop string was produced
    ABORTED = "aborted"  # Abort was called for it


@dataclass(frozen=True)
class StreamChunk:
    """One message of a request's stream: the tokens one step committed, their text, and, on the last one,
    why it ended."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    stats: SpeculationSummary


@dataclass(frozen=True)
class StreamError:
    """Queued instead of a chunk when a request cannot go on (e.g. its target is unreachable)."""

    code: Any  # grpc.StatusCode
    message: str


@dataclass
class LiveRequest:
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
    stats: RequestStats = field(default_factory=RequestStats)
    # How many leading tokens of ``tokens`` each service holds in its cache (0: send everything).
    target_cached: int = 0
    moves: int = 0  # times it moved to another target (its own failed or left)
    owner: str = ""  # who started it (`specfleet.security.Access.caller`): only they, or an admin, may abort it
    # Its session on each draft pool it may draft from, by pool name; ``draft`` and ``draft_cached`` are the session
    # of the one it drafts from this step.
    sessions: dict[str, DraftSession] = field(default_factory=dict)
    strategy: str = DRAFT_POOL  # where its drafts come from this step (see router.strategies)
    finish_reason: FinishReason | None = None
    cancelled: bool = False  # the client went away: stop quietly
    error: StreamError | None = None  # what failed it, if something did
    outbox: asyncio.Queue[StreamChunk | StreamError] = field(default_factory=asyncio.Queue)
    # For the metrics and traces: when it was admitted and got its first and latest tokens (perf_counter), its span.
    admitted_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0  # when a step loop took it from its queue
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    span: Any = None

    @property
    def draft(self) -> Any:
        """The draft replica it is pinned to in the pool it drafts from this step (None: none)."""
        session = self.sessions.get(self.strategy)
        return None if session is None else session.replica

    @property
    def drafter_kind(self) -> str | None:
        """The drafter kind of that replica, as it said (GetInfo); None when it has none yet, or drafts itself."""
        info = getattr(self.draft, "info", None)
        return None if info is None else info.kind

    @draft.setter
    def draft(self, replica: Any) -> None:
        self.sessions.setdefault(self.strategy, DraftSession()).replica = replica

    @property
    def draft_cached(self) -> int:
        """Leading tokens that replica holds."""
        session = self.sessions.get(self.strategy)
        return 0 if session is None else session.cached

    @draft_cached.setter
    def draft_cached(self, cached: int) -> None:
        self.sessions.setdefault(self.strategy, DraftSession()).cached = cached

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def tokens_left(self) -> int:
        """The tokens the request may still generate."""
        return self.max_new_tokens - (len(self.tokens) - self.prompt_len)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def commit(self, new_tokens: tuple[int, ...] | list[int], max_context: int) -> list[int]:
        """Appends the step's tokens up to the first stop condition; returns those kept."""
        kept: list[int] = []
        for token in new_tokens:
            self.tokens.append(token)
            kept.append(token)
            if token in self.eos_ids and not self.ignore_eos:
                self.finish_reason = FinishReason.EOS
                break
            if len(self.tokens) - self.prompt_len >= self.max_new_tokens or len(self.tokens) >= max_context:
                self.finish_reason = FinishReason.LENGTH
                break
        return kept

    def mark_emitted(self, now: float) -> float:
        """Notes that tokens reached the client at ``now``; returns how long it waited for them (since admission for
        the first tokens, else since the previous ones)."""
        waited = now - (self.last_token_at or self.admitted_at)
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        return waited

    def emit(self, new_tokens: list[int]) -> None:
        """Queues one stream message for the tokens just committed (and the end, if reached)."""
        text, stopped = self.stops.feed(self.detokenizer.add(new_tokens))
        if stopped:
            self.finish_reason = FinishReason.STOP
        elif self.finished:
            text += self.stops.flush()
        self.outbox.put_nowait(StreamChunk(new_tokens, text, self.finish_reason, self.stats.summary()))

    def finish(self, reason: FinishReason) -> None:
        """Ends the stream early (abort) with a last, empty message."""
        self.finish_reason = reason
        self.outbox.put_nowait(StreamChunk([], "", reason, self.stats.summary()))

    def fail(self, code: Any, message: str) -> None:
        """Ends the request with an error its client gets as a gRPC status."""
        self.cancelled = True
        self.error = StreamError(code, message)
        self.outbox.put_nowait(self.error)

    def outcome(self, deadline_passed: bool = False) -> tuple[str, str]:
        """How the request ended, as the metrics label it: ok, error, aborted or deadline, and the gRPC status code's
        name. Asked when the RPC handler is done with it: if it has not finished, the client went away."""
        if self.error is not None:
            return "error", self.error.code.name
        if self.finish_reason == FinishReason.ABORTED:
            return "aborted", "OK"
        if self.finish_reason is not None:
            return "ok", "OK"
        return ("deadline", "DEADLINE_EXCEEDED") if deadline_passed else ("aborted", "CANCELLED")

    def queue_time(self) -> float | None:
        """From admission until a step loop took it (None: it never left the queue)."""
        return self.started_at - self.admitted_at if self.started_at else None

    def time_per_output_token(self) -> float | None:
        generated = len(self.tokens) - self.prompt_len
        return (self.last_token_at - self.first_token_at) / (generated - 1) if generated > 1 else None
