"""The step loop's ports: what it calls to get drafts and verdicts, and who hears about each step.

The loop sees only these interfaces and the library's plain values (`specfleet.speculation`,
`specfleet.stats`). Their implementations:
- `Proposer`: a speculation strategy, or `router.strategies.Strategies`, which runs each sequence's own;
  `router.draft_pool.DraftPool` drafts on a pool of draft services;
- `Verifier`: `router.target_verifier.TargetVerifier` over one target service;
- links: the gRPC clients under those two (`router.draft_link`, `router.target_link`), the only modules that
  build or read protobuf; tests put in-process links behind the same protocols;
- `StepObserver`: Redis telemetry, OpenTelemetry metrics, the prediction audit and its calibration
  (`router.observers`, `router.prediction_audit`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from specfleet.speculation import DraftAsk, Proposal, Proposals, SessionReply, StepPlan, Verdict, Verdicts, VerifyAsk
from specfleet.stats import StepStats

if TYPE_CHECKING:
    from router.live_request import LiveRequest
    from router.replicas import ReplicaInfo


class Proposer(Protocol):
    """Where draft tokens come from: a speculation strategy."""

    def room(self, seq: LiveRequest) -> int | None:
        """Most draft tokens it can give ``seq`` now: 0 when it cannot draft for it (no drafter, or one that is
        failing), None when only the request and the target limit it."""
        ...

    async def propose(self, batch: list[LiveRequest], plan: StepPlan) -> Proposals:
        """Proposals for the sequences of ``batch`` whose plan drafts (none for one that gets no drafts)."""
        ...

    def settle(self, batch: list[LiveRequest], verdicts: Mapping[str, Verdict]) -> None:
        """The step's verdicts, committed: what each strategy keeps of its drafts (and, for strategies that
        draft from the verdict or ahead of it, what they draft next from)."""
        ...

    async def release(self, seqs: list[LiveRequest]) -> None:
        """Forget finished sequences."""
        ...


class Verifier(Protocol):
    """The target: verifies every sequence's proposal in one batched pass."""

    async def verify(self, batch: list[LiveRequest], proposals: Mapping[str, Proposal]) -> Verdicts:
        """A verdict per sequence of ``batch`` (plain decoding for those without a proposal). A sequence the
        target could not serve gets none, and has been failed with an error its client sees."""
        ...

    async def release(self, seq_ids: list[str]) -> None:
        ...


class StepObserver(Protocol):
    def observe(self, stats: StepStats) -> None:
        """One finished step. Called on the step's path: keep it to bookkeeping, defer anything slower."""
        ...


class StepTracer(Protocol):
    def step_span(self, target: str, request_spans: Iterable[Any]) -> AbstractContextManager[Any]:
        """The current span while a step runs (the calls it makes nest under it)."""
        ...


class DraftLink(Protocol):
    """One draft service, as the draft pool calls it."""

    async def propose(self, asks: list[DraftAsk], timeout_s: float) -> SessionReply[Proposal]:
        """Raises `router.grpc_link.ReplicaError` when the call fails, `ReplicaGone` when the replica left."""
        ...

    async def release(self, seq_ids: list[str], timeout_s: float = 10.0) -> None: ...

    async def info(self, timeout_s: float) -> ReplicaInfo: ...

    async def close(self, grace_s: float | None = None) -> None: ...


class TargetLink(Protocol):
    """One target service, as its verifier calls it."""

    async def verify(self, asks: list[VerifyAsk], timeout_s: float) -> SessionReply[Verdict]:
        """Raises `router.grpc_link.ReplicaError` when the call fails."""
        ...

    async def release(self, seq_ids: list[str], timeout_s: float = 10.0) -> None: ...

    async def info(self, timeout_s: float) -> ReplicaInfo: ...

    async def close(self, grace_s: float | None = None) -> None: ...
