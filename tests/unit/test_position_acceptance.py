"""A chain's first draft position priced at a rate of its own: the estimate, the expected tokens, the depth search
against brute force with it, and the policy reading each sequence's counts by position."""

from __future__ import annotations

import itertools
import random

import pytest
from step_fakes import live_request
from test_policy import _random_alphas, _random_costs

from router.planner import Planner
from router.policy_feed import PolicyFeed
from specfleet.config import RouterConfig
from specfleet.policy import (
    AnalyticCost,
    DepthPolicy,
    choose_depths,
    choose_depths_for_latency,
    expected_emitted,
    plan_goodput,
    plan_time_per_token,
)
from specfleet.policy.acceptance import acceptance_estimate, position_acceptance
from specfleet.stats import SequenceStep

REL = 1e-9


def _simulated_emitted(first: float, later: float, depth: int, trials: int, rng: random.Random) -> float:
    """Mean tokens per step when the first draft is accepted at ``first`` and each later one at ``later``."""
    total = 0
    for _ in range(trials):
        accepted = 0
        while accepted < depth and rng.random() < (first if accepted == 0 else later):
            accepted += 1
        total += accepted + 1
    return total / trials


@pytest.mark.parametrize(("first", "later", "depth"), [(0.5, 0.15, 2), (0.5, 0.15, 4), (0.3, 0.9, 3), (0.7, 0.7, 5)])
def test_expected_emitted_with_a_first_position_of_its_own_is_what_steps_emit(first, later, depth) -> None:
    simulated = _simulated_emitted(first, later, depth, 40_000, random.Random(0))
    assert expected_emitted(later, depth, first_alpha=first) == pytest.approx(simulated, abs=0.02)
    assert expected_emitted(later, 0, first_alpha=first) == 1.0
    assert expected_emitted(0.4, depth, 0.5, first_alpha=0.4) == pytest.approx(expected_emitted(0.4, depth, 0.5))
    assert expected_emitted(1.0, 3, first_alpha=0.5) == pytest.approx(1 + 0.5 * 3)


def test_without_counts_by_position_both_rates_are_the_pooled_one() -> None:
    pooled = acceptance_estimate(30, 20, 0.5, 8.0)
    assert position_acceptance(30, 20, 0, 0, 0.5, 8.0) == pytest.approx((pooled, pooled))
    assert position_acceptance(0, 0, 0, 0, 0.4, 8.0) == pytest.approx((0.4, 0.4))


def test_a_drafter_surer_of_its_first_token_gets_a_higher_first_rate() -> None:
    """100 steps of depth 2 as SPACE's fine-tuned masks do: the first candidate accepted in 50, the second in 8 of
    those. Without a prior the estimates are the maximum-likelihood ones, 50/100 and 8/50."""
    first, later = position_acceptance(58, 92, 50, 100, 0.5, 0.0)
    assert (first, later) == pytest.approx((0.5, 8 / 50))
    first, later = position_acceptance(58, 92, 50, 100, 0.5, 8.0)
    pooled = acceptance_estimate(58, 92, 0.5, 8.0)
    assert later < pooled < first
    # Prompt lookup's shape: a matched span goes on, so later positions are accepted more often than the first.
    first, later = position_acceptance(70, 60, 40, 100, 0.5, 8.0)
    assert first < later


def test_impossible_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="first_accepted <= first_tried"):
        position_acceptance(5, 5, 6, 5, 0.5, 8.0)
    with pytest.raises(ValueError, match="first_alpha"):
        expected_emitted(0.5, 2, first_alpha=1.5)
    with pytest.raises(ValueError, match="one entry per sequence"):
        choose_depths([0.5, 0.5], _random_costs(random.Random(0)), 3, first_alphas=[0.5])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_depth_search_with_first_rates_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        batch, max_depth = rng.randint(1, 3), rng.randint(0, 4)
        alphas, firsts, costs = _random_alphas(rng, batch), _random_alphas(rng, batch), _random_costs(rng)
        plans = list(itertools.product(range(max_depth + 1), repeat=batch))
        decision = choose_depths(alphas, costs, max_depth, first_alphas=firsts)
        best = max(plan_goodput(alphas, plan, costs, first_alphas=firsts) for plan in plans)
        assert decision.goodput == pytest.approx(plan_goodput(alphas, decision.depths, costs, first_alphas=firsts),
                                                 rel=REL)
        assert decision.goodput >= best * (1 - REL), (alphas, firsts, max_depth, decision)
        latency = choose_depths_for_latency(alphas, costs, max_depth, first_alphas=firsts)
        fastest = min(plan_time_per_token(alphas, plan, costs, first_alphas=firsts) for plan in plans)
        assert latency.time_per_token_ms <= fastest * (1 + REL), (alphas, firsts, max_depth, latency)


def test_the_policy_drafts_one_where_only_the_first_position_pays() -> None:
    """1000 steps of depth 2 in which the first draft was accepted half the time and the second a sixth of the time
    (SPACE's fine-tuned masks): the pooled rate, 0.39 at every position, overvalues the second draft and
    undervalues the first. Where each draft token costs a twentieth of the verify, the policy that reads the counts
    by position drafts 1, the best plan under the rates the steps show; the pooled one drafts 2."""
    costs = {"target": AnalyticCost(fixed_ms=20.0, per_token_ms=1.0), "draft": AnalyticCost(0.5, per_token_ms=0.5),
             "overhead": AnalyticCost(fixed_ms=1.0)}
    policy = DepthPolicy(max_depth=4, min_gain=0.0, prior_weight=8.0, defaults=costs)
    counts, first_position = [(580, 920)], [(500, 1000)]
    by_position, pooled = policy.choose(counts, first_position_counts=first_position), policy.choose(counts)
    first, later = position_acceptance(580, 920, 500, 1000, policy.fleet_alpha, 8.0)
    goodput = {d: plan_goodput([later], [d], policy.costs, first_alphas=[first]) for d in range(5)}
    assert by_position.depths == (1,) == (max(goodput, key=goodput.get),)
    assert by_position.goodput == pytest.approx(goodput[1], rel=REL)
    assert pooled.depths == (2,)
    assert goodput[2] < goodput[1]


def test_the_planner_hands_the_policy_each_sequence_s_counts_by_position() -> None:
    """A sequence whose steps went as above: the router's planner drafts it 1 deep, as the policy does with the
    counts by position; with the same counts pooled (no first-position counts) it would draft 2."""

    class AnyRoom:
        def room(self, seq: object) -> None:
            return None

    costs = {"target": AnalyticCost(fixed_ms=20.0, per_token_ms=1.0), "draft": AnalyticCost(0.5, per_token_ms=0.5),
             "overhead": AnalyticCost(fixed_ms=1.0)}
    policy = DepthPolicy(max_depth=4, min_gain=0.0, prior_weight=8.0, defaults=costs)
    planner = Planner(RouterConfig(max_depth=4), PolicyFeed(policy, None, 1.0, "throughput"), AnyRoom(),  # type: ignore[arg-type]
                      "target:1", max_context=100_000)
    seq = live_request("s", [1] * 20, 64)
    for accepted, times in ((0, 500), (1, 420), (2, 80)):
        for _ in range(times):
            seq.stats.acceptance.observe(SequenceStep(2, 2, accepted, int(accepted < 2)))
    assert (seq.stats.acceptance.first_accepted, seq.stats.acceptance.rejections) == (580, 920)
    assert planner.plan([seq]).draft("s").levels == 1
    assert policy.choose([(580, 920)]).depths == (2,)
