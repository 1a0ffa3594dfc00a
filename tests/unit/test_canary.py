"""The losslessness canary catches a verifier that accepts a wrong token one time in a thousand, and stays quiet
over hundreds of requests when nothing is wrong. The real fleet, step loop, draft pool and canary run over the
in-process fakes of tests/unit/step_fakes.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from step_fakes import VOCAB, FakeDrafter, FakeTarget, ToyTokenizer, live_request

from router.canary import Canary, Replay, first_difference
from router.fleet import Fleet
from router.live_request import FinishReason, LiveRequest
from router.policy_feed import PolicyFeed
from router.replicas import DraftReplica, ReplicaInfo, TargetReplica
from specfleet.config import RouterConfig
from specfleet.otel import RouterMetrics
from specfleet.policy import DepthPolicy
from specfleet.speculation import Proposal, Verdict

REQUESTS = 200


@dataclass
class FlippingTarget(FakeTarget):
    """A broken verifier: every ``every``-th accepted draft token comes back as another token."""

    every: int = 0  # 0: never
    accepted_so_far: int = 0
    flips: int = 0

    def _verdict(self, tokens: list[int], proposal: Proposal | None) -> Verdict:
        verdict = super()._verdict(tokens, proposal)
        if not self.every or not verdict.accepted:
            return verdict
        before, self.accepted_so_far = self.accepted_so_far, self.accepted_so_far + verdict.accepted
        if before // self.every == self.accepted_so_far // self.every:
            return verdict
        self.flips += 1
        wrong = ((verdict.tokens[0] + 1) % VOCAB, *verdict.tokens[1:])
        return Verdict(wrong, verdict.accepted, verdict.accepted_nodes, verdict.next_proposal)


async def serve_with_canary(target: FlippingTarget) -> Canary:
    config = RouterConfig(depth="3", targets="t:1", drafts="d:1")
    fleet = Fleet(config, PolicyFeed(DepthPolicy.fixed(3), None, 1.0, "throughput"), None, RouterMetrics())
    info = await target.info(1)
    fleet._add_target(TargetReplica("t:1", target, info))
    fleet.reference = fleet.targets["t:1"]
    draft = DraftReplica("d:1", FakeDrafter(), ReplicaInfo("toy", "model", VOCAB, "toy", 256, 8))
    canary = Canary(1.0, fleet.place, lambda: True, ToyTokenizer(), on_result=lambda *_: None)
    for i in range(REQUESTS):
        seq = live_request(f"r{i}", [i % VOCAB, (3 * i + 1) % VOCAB], 20, draft=draft)
        fleet.place(seq)
        while not seq.finished:
            await asyncio.sleep(0)
        canary.consider(seq)
        while canary._busy:
            await asyncio.sleep(0)
    await fleet.stop()
    return canary


def test_the_canary_catches_one_wrong_token_in_a_thousand() -> None:
    target = FlippingTarget(every=1000)
    canary = asyncio.run(serve_with_canary(target))
    assert target.flips >= 1
    assert canary.replays == REQUESTS and canary.mismatches == target.flips


def test_the_canary_is_quiet_when_nothing_is_wrong() -> None:
    canary = asyncio.run(serve_with_canary(FlippingTarget()))
    assert canary.replays == REQUESTS and canary.mismatches == 0


def _finished(tokens: list[int], prompt_len: int, reason: FinishReason | None, temperature: float = 0.0
              ) -> LiveRequest:
    seq = live_request("r", tokens[:prompt_len], 8)
    seq.tokens = list(tokens)
    seq.finish_reason = reason
    if temperature:
        from specfleet.sampling_params import SamplingParams

        seq.sampling = SamplingParams(temperature)
    return seq


@pytest.mark.parametrize(("seq", "replayed"), [
    (_finished([1, 2, 3, 4], 2, FinishReason.LENGTH), True),
    (_finished([1, 2, 3, 4], 2, FinishReason.EOS), True),
    (_finished([1, 2, 3, 4], 2, FinishReason.ABORTED), False),  # it did not run to its own end
    (_finished([1, 2, 3, 4], 2, FinishReason.LENGTH, temperature=0.7), False),  # sampled: another answer is right
    (_finished([1, 2], 2, FinishReason.LENGTH), False),  # nothing generated
])
def test_what_is_replayed(seq: LiveRequest, replayed: bool) -> None:
    assert (Replay.of(seq) is not None) == replayed


def test_first_difference() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
