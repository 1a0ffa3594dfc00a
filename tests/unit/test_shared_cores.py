"""Drafting ahead on the target's own CPU cores: services say where they compute (GetInfo's host and cores), the
planner tells the policy when a draft pool shares the target's cores, and the policy then prices the draft made
ahead and the verify one after the other instead of overlapping."""

from __future__ import annotations

import pytest
from step_fakes import live_request

from router.draft_ahead import DraftAhead
from router.draft_pool import DraftPool
from router.live_request import DRAFT_POOL
from router.planner import Planner
from router.policy_feed import PolicyFeed
from router.replicas import DraftReplica, ReplicaInfo
from router.strategies import Strategies
from specfleet.config import RouterConfig
from specfleet.otel import RouterMetrics
from specfleet.placement import compute_cores, share_cores
from specfleet.policy import AnalyticCost, CostModel, DepthPolicy, price_step

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


def test_on_shared_cores_a_draft_made_ahead_is_priced_after_the_verify_not_beside_it() -> None:
    alpha = 0.8
    shared = CostModel(CPU_DRAFT_CPU_TARGET, ahead_alpha=alpha, ahead_shares_cores=True).step_costs(1, 4)
    apart = CostModel(CPU_DRAFT_CPU_TARGET, ahead_alpha=alpha).step_costs(1, 4)
    draft, target = CPU_DRAFT_CPU_TARGET["draft"], CPU_DRAFT_CPU_TARGET["target"]
    for depth in range(1, 5):
        now = (1 - alpha ** (depth + 1)) * draft(1, depth) + 1.0
        assert price_step(shared, depth, float(depth)) == pytest.approx(
            now + draft(1, depth + 1) + target(1, 1 + depth))
        assert price_step(apart, depth, float(depth)) == pytest.approx(
            now + max(draft(1, depth + 1), target(1, 1 + depth)))


def test_the_policy_drafts_shallower_on_shared_cores_and_says_why() -> None:
    policy = DepthPolicy(8, defaults=CPU_DRAFT_CPU_TARGET, drafts_ahead=True)
    apart = policy.choose([(40, 4)])
    policy.set_ahead_shares_cores(True)
    shared = policy.choose([(40, 4)])
    assert 0 < shared.depths[0] < apart.depths[0]
    assert "on the target's CPU cores" in shared.reason and "within the" in apart.reason
    policy.set_ahead_shares_cores(False)
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
    assert policy.ahead_shares_cores is shared
