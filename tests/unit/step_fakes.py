"""In-process stand-ins behind the step loop's ports, for tests that run the real loop in milliseconds.

`ToyModel` is the "target model": a deterministic next token for any context, so plain greedy decoding has one
right answer (`ToyModel.generate`) that speculation must reproduce token for token. `FakeTarget` and
`FakeDrafter` keep sessions as the real services do (roll back, append, say when they do not know a sequence),
so the router's real session code runs against them; `SelfDrafted` drafts in a way the loop has no code for, the
target's verdict bringing the next drafts, to show it plugs in without it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from router.live_request import DRAFT_POOL, DraftSession, FinishReason, LiveRequest, StreamChunk
from router.loop import StepLoop
from router.replicas import ReplicaError, ReplicaInfo
from router.text import IncrementalDetokenizer, StopMatcher
from specfleet.sampling_params import SamplingParams
from specfleet.speculation import (
    DraftAsk,
    Proposal,
    SessionReply,
    Verdict,
    VerifyAsk,
)
from specfleet.stats import StepStats
from specfleet.telemetry import LatencySample
from specfleet.trees.shapes import ROOT_PARENT

VOCAB = 50


@dataclass(frozen=True)
class ToyModel:
    """Greedy next token of a context: a fixed hash of its last two tokens and its length."""

    def next_token(self, tokens: list[int]) -> int:
        return (7 * tokens[-1] + 3 * (tokens[-2] if len(tokens) > 1 else 0) + len(tokens)) % VOCAB

    def generate(self, prompt: list[int], n: int) -> list[int]:
        tokens = list(prompt)
        for _ in range(n):
            tokens.append(self.next_token(tokens))
        return tokens[len(prompt):]

    def guess(self, tokens: list[int], n: int, wrong_every: int = 3) -> list[int]:
        """A drafter's continuation of ``tokens``: right except at every ``wrong_every``-th position of the
        sequence, so some drafts are rejected."""
        out, context = [], list(tokens)
        for _ in range(n):
            token = self.next_token(context)
            if len(context) % wrong_every == 0:
                token = (token + 1) % VOCAB
            out.append(token)
            context.append(token)
        return out


class Sessions:
    """Per-sequence caches as a service keeps them: a call rolls back, then appends."""

    def __init__(self) -> None:
        self.cache: dict[str, list[int]] = {}

    def apply(self, seq_id: str, rollback_to: int, new_tokens: list[int]) -> list[int] | None:
        """The sequence after the call's delta, or None when it is unknown (and rollback_to says it should be known)."""
        if seq_id not in self.cache and rollback_to > 0:
            return None
        tokens = self.cache.get(seq_id, [])[:rollback_to] + list(new_tokens)
        self.cache[seq_id] = tokens
        return tokens

    def forget(self, seq_id: str) -> None:
        self.cache.pop(seq_id, None)


@dataclass
class FakeService:
    """What the fake target and drafter share: the toy model, sessions, and the calls every service answers."""

    model: ToyModel = field(default_factory=ToyModel)
    sessions: Sessions = field(default_factory=Sessions)
    released: list[str] = field(default_factory=list)
    kind = "service"

    async def release(self, seq_ids: list[str], timeout_s: float = 10.0) -> None:
        self.released.extend(seq_ids)
        for seq_id in seq_ids:
            self.sessions.forget(seq_id)

    async def info(self, timeout_s: float) -> ReplicaInfo:
        return ReplicaInfo("toy", self.kind, VOCAB, "toy", max_seq_len=256, num_slots=8)

    async def close(self, grace_s: float | None = None) -> None:
        pass


@dataclass
class FakeTarget(FakeService):
    """A `TargetLink`: greedy verification of chains and trees against the `ToyModel`. A proposal with
    ``draft_next`` also gets the next step's candidates from the same call (with some wrong, as a drafter's)."""

    asks: list[list[VerifyAsk]] = field(default_factory=list)  # every call's entries
    calls_in_flight: int = 0
    kind = "target"

    async def verify(self, asks: list[VerifyAsk], timeout_s: float) -> SessionReply[Verdict]:
        self.asks.append(asks)
        self.calls_in_flight += 1
        await asyncio.sleep(0)  # a real call yields to the event loop: work drafted ahead runs meanwhile
        self.calls_in_flight -= 1
        reply = SessionReply[Verdict]({}, {}, [], 1.0)
        for ask in asks:
            tokens = self.sessions.apply(ask.delta.seq_id, ask.delta.rollback_to, ask.delta.new_tokens)
            if tokens is None:
                reply.unknown.append(ask.delta.seq_id)
                continue
            verdict = self._verdict(tokens, ask.proposal)
            reply.answers[ask.delta.seq_id] = verdict
            accepted = list(verdict.tokens[:-1])
            self.sessions.cache[ask.delta.seq_id] = tokens + accepted  # the target's token is not cached yet
            reply.cached_len[ask.delta.seq_id] = len(tokens) + len(accepted)
        return reply

    def _verdict(self, tokens: list[int], proposal: Proposal | None) -> Verdict:
        path: list[int] = []
        accepted: list[int] = []
        drafts = proposal.tokens if proposal is not None else ()
        parents = proposal.parents if proposal is not None and proposal.parents is not None else tuple(
            range(-1, len(drafts) - 1))
        parent = ROOT_PARENT
        while True:
            want = self.model.next_token(tokens + accepted)
            match = next((j for j, p in enumerate(parents) if p == parent and drafts[j] == want), None)
            if match is None:
                break
            path.append(match)
            accepted.append(want)
            parent = match
        emitted = (*accepted, self.model.next_token(tokens + accepted))
        next_proposal = None
        if proposal is not None and proposal.draft_next:
            next_proposal = Proposal(tuple(self.model.guess(tokens + list(emitted), proposal.draft_next)))
        return Verdict(emitted, len(accepted), tuple(path) if proposal and proposal.parents else (), next_proposal)


@dataclass
class FakeDrafter(FakeService):
    """A `DraftLink`: chains from `ToyModel.guess` (wrong at every ``wrong_every``-th position), with sessions;
    ``fail_calls`` makes its next calls fail."""

    fail_calls: int = 0
    wrong_every: int = 3
    calls: int = 0
    kind = "model"

    async def propose(self, asks: list[DraftAsk], timeout_s: float) -> SessionReply[Proposal]:
        self.calls += 1
        await asyncio.sleep(0)
        if self.fail_calls:
            self.fail_calls -= 1
            raise ReplicaError("UNAVAILABLE", "the drafter is down")
        reply = SessionReply[Proposal]({}, {}, [], 0.5)
        for ask in asks:
            tokens = self.sessions.apply(ask.delta.seq_id, ask.delta.rollback_to, ask.delta.new_tokens)
            if tokens is None:
                reply.unknown.append(ask.delta.seq_id)
                continue
            drafts = self.model.guess(tokens, ask.plan.levels, self.wrong_every)
            self.sessions.cache[ask.delta.seq_id] = tokens + drafts  # a drafter feeds itself its drafts
            reply.answers[ask.delta.seq_id] = Proposal(tuple(drafts))
            reply.cached_len[ask.delta.seq_id] = len(tokens) + len(drafts)
        return reply


class Recorder:
    """A `StepObserver` that keeps every step's stats."""

    def __init__(self) -> None:
        self.steps: list[StepStats] = []

    def observe(self, stats: StepStats) -> None:
        self.steps.append(stats)


class NoTracing:
    def step_span(self, target: str, request_spans: Iterable[object]) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class ToyTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)


def live_request(seq_id: str, prompt: list[int], max_new_tokens: int, strategy: str = DRAFT_POOL,
                 draft: object = None) -> LiveRequest:
    return LiveRequest(request_id=seq_id, seq_id=seq_id, tokens=list(prompt), prompt_len=len(prompt),
                       sampling=SamplingParams(), seed=0, max_new_tokens=max_new_tokens, eos_ids=frozenset(),
                       ignore_eos=True, detokenizer=IncrementalDetokenizer(ToyTokenizer()), stops=StopMatcher([]),
                       sessions={strategy: DraftSession(draft)}, strategy=strategy)


async def run_loop(loop: StepLoop, seqs: list[LiveRequest]) -> list[list[int]]:
    """Runs the step loop with ``seqs`` submitted at once until each has streamed its last message; their tokens."""
    run = asyncio.get_running_loop().create_task(loop.run())
    for seq in seqs:
        loop.submit(seq)
    outputs = [(await streamed(seq))[0] for seq in seqs]
    await asyncio.sleep(0.01)  # let the loop release the finished sequences
    run.cancel()
    return outputs


async def streamed(seq: LiveRequest, timeout_s: float = 30.0) -> tuple[list[int], FinishReason]:
    """The request's streamed tokens and why it finished, once its last message came (each within ``timeout_s``)."""
    tokens: list[int] = []
    while True:
        chunk = await asyncio.wait_for(seq.outbox.get(), timeout_s)
        assert isinstance(chunk, StreamChunk), chunk
        tokens.extend(chunk.token_ids)
        if chunk.finish_reason is not None:
            return tokens, chunk.finish_reason


class RecordedTelemetry:
    """A service's telemetry port, keeping the latency samples it was given (``role`` None: ``default_role``)."""

    def __init__(self, default_role: str = "target") -> None:
        self.default_role = default_role
        self.samples: list[LatencySample] = []

    def record_latency(self, batch_size: int, tokens_per_seq: float, ms: float, role: str | None = None,
                       context: float | None = None, drafter: str | None = None, widest: float | None = None) -> None:
        self.samples.append(LatencySample(role or self.default_role, "replica", batch_size, tokens_per_seq, ms,
                                          context, drafter, widest))
