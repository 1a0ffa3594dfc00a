"""The router's policy feed refits while the router steps, rarely while it idles, and keeps trying a lost Redis."""

from __future__ import annotations

import asyncio

import pytest

from router import policy_feed
from router.policy_feed import PolicyFeed
from specfleet.policy import DepthPolicy
from specfleet.stats import AcceptanceCounts
from specfleet.telemetry import FleetView


class CountingSource:
    """A telemetry source that counts its reads; `up` says whether it answers."""

    def __init__(self) -> None:
        self.reads = 0
        self.up = True

    def read(self) -> FleetView | None:
        self.reads += 1
        return FleetView([], AcceptanceCounts(), {}) if self.up else None


async def _run_for(feed: PolicyFeed, seconds: float, decide_every_s: float | None = None) -> None:
    task = asyncio.create_task(feed.run())
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            await asyncio.sleep(decide_every_s or seconds)
            if decide_every_s is not None:
                feed.record_decision("batch 1: depth 2")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture
def short_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_feed, "IDLE_REFRESH_S", 2.0)


def test_idle_router_refits_rarely(short_idle) -> None:
    source = CountingSource()
    feed = PolicyFeed(DepthPolicy(8), source, refresh_s=0.05, mode="throughput")
    asyncio.run(_run_for(feed, 1.0))
    assert source.reads == 1  # at start only: nothing stepped since
    assert feed.refreshes == 1 and feed.redis_up


def test_busy_router_refits_every_refresh(short_idle) -> None:
    source = CountingSource()
    feed = PolicyFeed(DepthPolicy(8), source, refresh_s=0.05, mode="throughput")
    asyncio.run(_run_for(feed, 1.0, decide_every_s=0.02))
    assert source.reads >= 8  # ~one per 0.05 s (scheduling on a loaded machine leaves slack)
    assert feed.last_decision == "batch 1: depth 2"


def test_first_step_after_idling_refits_at_once(short_idle) -> None:
    source = CountingSource()
    feed = PolicyFeed(DepthPolicy(8), source, refresh_s=0.05, mode="throughput")

    async def scenario() -> None:
        task = asyncio.create_task(feed.run())
        await asyncio.sleep(0.5)
        idle_reads = source.reads
        feed.record_decision("batch 1: depth 0")
        deadline = asyncio.get_running_loop().time() + 1.0  # well under the idle interval
        while source.reads < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert idle_reads == 1 and source.reads == 2

    asyncio.run(scenario())


def test_lost_redis_is_retried_at_the_busy_rate(short_idle) -> None:
    source = CountingSource()
    source.up = False
    feed = PolicyFeed(DepthPolicy(8), source, refresh_s=0.05, mode="throughput")
    asyncio.run(_run_for(feed, 1.0))
    assert source.reads >= 8 and not feed.redis_up and feed.refreshes == 0


def test_each_drafter_kinds_counts_reach_the_policy() -> None:
    """The fleet's counts per drafter kind give each kind's priors: its acceptance and its offer rate."""
    ngram = AcceptanceCounts(sequence_steps=600, accepted=100, rejections=400, misses=500)
    model = AcceptanceCounts(sequence_steps=300, accepted=800, rejections=200, misses=0)
    fleet = AcceptanceCounts()
    fleet.merge(ngram)
    fleet.merge(model)

    class KindsSource:
        def read(self) -> FleetView:
            return FleetView([], fleet, {}, {"ngram": ngram, "model": model})

    feed = PolicyFeed(DepthPolicy(8), KindsSource(), refresh_s=1.0, mode="throughput")
    asyncio.run(feed.refresh())
    policy = feed.policy
    assert policy.fleet_alpha_for("ngram") < policy.fleet_alpha < policy.fleet_alpha_for("model")
    assert policy.fleet_offer_rate_for("ngram") < policy.fleet_offer_rate < policy.fleet_offer_rate_for("model")
    assert policy.fleet_offer_rate_for("model") == pytest.approx(1.0, abs=0.03)
