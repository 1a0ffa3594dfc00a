"""A Verify that prefills long prompts gets time for them: the timeout grows with the tokens the call carries."""

from __future__ import annotations

import asyncio

from step_fakes import FakeTarget, live_request

from router.replicas import TargetReplica
from router.target_verifier import TOKENS_PER_TIMEOUT, TargetVerifier
from specfleet.otel import RouterMetrics
from specfleet.speculation import SessionReply, Verdict, VerifyAsk


class TimedTarget(FakeTarget):
    """A `FakeTarget` that notes each call's timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float] = []

    async def verify(self, asks: list[VerifyAsk], timeout_s: float) -> SessionReply[Verdict]:
        self.timeouts.append(timeout_s)
        return await super().verify(asks, timeout_s)


def test_the_timeout_grows_with_the_prompts_a_call_prefills() -> None:
    target = TimedTarget()
    verifier = TargetVerifier(TargetReplica("target:1", target), 60.0, RouterMetrics())
    long_batch = [live_request(f"s{i}", [i % 90 + 1] * 4096, 4) for i in range(8)]
    asyncio.run(verifier.verify(long_batch, {}))
    asyncio.run(verifier.verify(long_batch, {}))  # now cached: one token each
    assert target.timeouts == [60.0 * 8 * 4096 / TOKENS_PER_TIMEOUT, 60.0]
