"""Drafting ahead on the target's own CPU cores: services say where they compute (GetInfo's host and cores), the
planner tells the policy when a draft pool shares the target's cores, and the policy then prices the draft made
ahead and the verify as slowing each other: one after the other until the router's steps measure by how much
(`ContentionFit`), then the longer plus that share of the shorter."""

from __future__ import annotations

import pytest
from step_fakes import live_request

from router.draft_ahead import DraftAhead
from router.draft_pool import DraftPool
from router.live_request import DRAFT_POOL
from router.planner import Planner
from router.policy_feed import PolicyFeed
from router.prediction_audit import ContentionFit
from router.replicas import DraftReplica, ReplicaInfo
from router.strategies import Strategies
from specfleet.config import RouterConfig
from specfleet.otel import RouterMetrics
from specfleet.placement import compute_cores, share_cores
from specfleet.policy import AheadOverlap, AnalyticCost, CostModel, DepthPolicy, price_step
from specfleet.stats import StepStats

CPU_DRAFT_CPU_TARGET = {
    "target": AnalyticCost(fixed_ms=30.0, per_token_ms=2.0),
    "draft": AnalyticCost(fixed_ms=1.0, per_token_ms=6.0),
    "overhead": AnalyticCost(fixed_ms=1.0),
}


def test_two_services_share_cores_only_on_one_machine_with_a_core_in_common() -> None:
    assert share_cores("node-a", (0, 1), "node-a", (1, 2))
    assert not share_cores("node-a", (0,), "node-a", (1,))  # pinned apart
    assert not share_cores("node-a", (0, 1), "node-b", (0, 1))  # two machines
    assert not share_cores("node-a", (0, 1), "node-a", ())  # the target computes on an accelerator
    assert not share_cores("", (0,), "", (0,))  # neither said where it runs
    assert compute_cores(on_cpu=False) == ()
    assert compute_cores(on_cpu=True)  # this process's affinity


def test_a_draft_made_ahead_is_priced_as_the_longer_of_it_and_the_verify_plus_the_contention_of_the_shorter() -> None:
    alpha = 0.8
    turns = CostModel(CPU_DRAFT_CPU_TARGET, ahead_alpha=alpha, ahead_contention=1.0).step_costs(1, 4)
    partly = CostModel(CPU_DRAFT_CPU_TARGET, ahead_alpha=alpha, ahead_contention=0.3).step_costs(1, 4)
    apart = CostModel(CPU_DRAFT_CPU_TARGET, ahead_alpha=alpha).step_costs(1, 4)
    draft, target = CPU_DRAFT_CPU_TARGET["draft"], CPU_DRAFT_CPU_TARGET["target"]
    for depth in range(1, 5):
        now = (1 - alpha ** (depth + 1)) * draft(1, depth) + 1.0
        ahead, verify = draft(1, depth + 1), target(1, 1 + depth)
        assert price_step(turns, depth, float(depth)) == pytest.approx(now + ahead + verify)
        assert price_step(partly, depth, float(depth)) == pytest.approx(
            now + max(ahead, verify) + 0.3 * min(ahead, verify))
        assert price_step(apart, depth, float(depth)) == pytest.approx(now + max(ahead, verify))
    with pytest.raises(ValueError, match="ahead_contention"):
        CostModel(CPU_DRAFT_CPU_TARGET, ahead_contention=1.5)


def test_a_step_measures_the_contention_that_would_have_priced_it_exactly() -> None:
    overlap = AheadOverlap(ahead_ms=100.0, verify_ms=300.0, contention=1.0)
    # Priced at 10 + 300 + 100 = 410 ms; it took 340: only 30 of the draft's 100 ms added to the verify.
    assert overlap.measured_contention(410.0, 340.0) == pytest.approx(0.3)
    assert AheadOverlap(0.0, 300.0, 1.0).measured_contention(310.0, 320.0) is None
    fit = ContentionFit(window=8, min_steps=4)
    steps = [StepStats("t", 1, [3], 3, predicted_ms=410.0, overlap=overlap, duration_s=ms / 1000)
             for ms in (340.0, 330.0, 350.0)]
    for stats in steps:
        fit.observe(stats)
    fit.observe(StepStats("t", 1, [3], 3, predicted_ms=410.0, overlap=overlap, prefilled=True, duration_s=2.0))
    fit.observe(StepStats("t", 1, [0], 0, predicted_ms=300.0, duration_s=0.3))  # plain: nothing to measure
    assert fit.estimate() is None  # three steps so far
    fit.observe(steps[0])
    assert fit.estimate() == pytest.approx(0.3)
    for _ in range(8):  # steps slower than taking turns: the contention is capped at 1
        fit.observe(StepStats("t", 1, [3], 3, predicted_ms=410.0, overlap=overlap, duration_s=0.6))
    assert fit.estimate() == 1.0


def test_the_policy_drafts_shallower_on_shared_cores_and_says_why() -> None:
    policy = DepthPolicy(8, defaults=CPU_DRAFT_CPU_TARGET, drafts_ahead=True)
    apart = policy.choose([(40, 4)])
    policy.set_ahead_contention(1.0)
    shared = policy.choose([(40, 4)])
    assert 0 < shared.depths[0] < apart.depths[0]
    assert "on the target's CPU cores: priced one after the other" in shared.reason and "within the" in apart.reason
    assert shared.overlap is not None and shared.overlap.contention == 1.0
    policy.set_ahead_contention(0.25)
    partly = policy.choose([(40, 4)])
    assert shared.depths[0] <= partly.depths[0] <= apart.depths[0]
    assert "priced the longer plus 25% of the shorter" in partly.reason
    policy.set_ahead_contention(0.0)
    assert policy.choose([(40, 4)]).depths == apart.depths


def _info(kind: str, host: str, cpus: tuple[int, ...]) -> ReplicaInfo:
    return ReplicaInfo("toy", kind, 16, "toy", max_seq_len=256, num_slots=8, host=host, cpus=cpus)


@pytest.mark.parametrize(("draft_cpus", "shared"), [((0, 1), True), ((2,), False), ((), False)])
def test_the_planner_tells_the_policy_when_the_draft_pool_computes_on_the_targets_cores(
        draft_cpus: tuple[int, ...], shared: bool) -> None:
    metrics = RouterMetrics()
    policy = DepthPolicy(8, drafts_ahead=True)
    feed = PolicyFeed(policy, None, 1.0, "throughput")
    strategies = Strategies({DRAFT_POOL: DraftAhead(DraftPool(2000.0, 60.0, metrics), metrics)})
    planner = Planner(RouterConfig(draft_ahead=True), feed, strategies, "target:1", 256,
                      target_info=_info("target", "node-a", (0, 1)))
    replica = DraftReplica("draft:1", object())  # type: ignore[arg-type]
    replica.info = _info("llamacpp", "node-a", draft_cpus)
    planner.plan([live_request("s", [1, 2, 3], 8, draft=replica)])
    assert policy.ahead_contention == (1.0 if shared else 0.0)  # taking turns until the steps measure it


def test_the_planner_prices_shared_cores_at_the_contention_its_steps_measured() -> None:
    metrics = RouterMetrics()
    policy = DepthPolicy(8, drafts_ahead=True)
    strategies = Strategies({DRAFT_POOL: DraftAhead(DraftPool(2000.0, 60.0, metrics), metrics)})
    fit = ContentionFit(window=8, min_steps=2)
    planner = Planner(RouterConfig(draft_ahead=True), PolicyFeed(policy, None, 1.0, "throughput"), strategies,
                      "target:1", 256, target_info=_info("target", "node-a", (0, 1)), contention=fit)
    replica = DraftReplica("draft:1", object())  # type: ignore[arg-type]
    replica.info = _info("llamacpp", "node-a", (0, 1))
    seq = live_request("s", [1, 2, 3], 8, draft=replica)
    planner.plan([seq])
    assert policy.ahead_contention == 1.0
    overlap = AheadOverlap(100.0, 300.0, 1.0)
    for ms in (340.0, 350.0):
        fit.observe(StepStats("t", 1, [3], 3, predicted_ms=410.0, overlap=overlap, duration_s=ms / 1000))
    plan = planner.plan([seq])
    assert policy.ahead_contention == pytest.approx(0.35)
    assert plan.overlap is None or plan.overlap.contention == pytest.approx(0.35)
    fit.observe(StepStats("t", 1, [3], 3, predicted_ms=410.0, overlap=overlap, duration_s=0.36))
    planner.plan([seq])  # the median moved by 0.05: not worth re-pricing
    assert policy.ahead_contention == pytest.approx(0.35)
