"""Pricing a step when the router drafts ahead (--draft-ahead): the drafts for the next step overlap the verify, so
the longer of the two counts, and the depth search, still exact against brute force, sizes drafts to fit."""

from __future__ import annotations

import itertools
import random

import pytest

from specfleet.policy import AnalyticCost, CostModel, DepthPolicy, choose_depths, plan_goodput, price_step

# A CPU draft beside a GPU target: the verify is memory-bound (about as long for 1 token as for 8), the draft pays
# per token.
CPU_DRAFT_GPU_TARGET = {
    "target": AnalyticCost(fixed_ms=30.0, per_token_ms=0.1),
    "draft": AnalyticCost(fixed_ms=1.0, per_token_ms=9.0),
    "overhead": AnalyticCost(fixed_ms=1.0),
}


def test_a_step_costs_the_longer_of_drafting_ahead_and_verifying_plus_drafting_now_when_dropped() -> None:
    alpha = 0.8
    steps = CostModel(CPU_DRAFT_GPU_TARGET, ahead_alpha=alpha).step_costs(1, 4)
    draft, target = CPU_DRAFT_GPU_TARGET["draft"], CPU_DRAFT_GPU_TARGET["target"]
    for depth in range(1, 5):
        dropped = 1 - alpha ** (depth + 1)  # every draft and the guess of the target's token must come true
        expected = dropped * draft(1, depth) + max(draft(1, depth + 1), target(1, 1 + depth)) + 1.0
        assert price_step(steps, depth, float(depth)) == pytest.approx(expected)
    plain = CostModel(CPU_DRAFT_GPU_TARGET).step_costs(1, 4)
    assert price_step(steps, 0, 0.0) == price_step(plain, 0, 0.0)  # nothing drafted, nothing overlaps
    # At batch 4 drafts made ahead are all used less often: drafting now is more likely.
    assert CostModel(CPU_DRAFT_GPU_TARGET, ahead_alpha=alpha).step_costs(4, 4).drafting_now[2] > steps.drafting_now[2]


def test_drafts_are_sized_to_fit_inside_the_verify_they_overlap() -> None:
    alpha = 0.9
    ahead = choose_depths([alpha], CostModel(CPU_DRAFT_GPU_TARGET, ahead_alpha=alpha), 8)
    taking_turns = choose_depths([alpha], CostModel(CPU_DRAFT_GPU_TARGET), 8)
    depth = ahead.depths[0]
    steps = CostModel(CPU_DRAFT_GPU_TARGET, ahead_alpha=alpha).step_costs(1, 8)
    assert depth > 0 and steps.ahead_ms[depth] <= steps.target_at(depth)  # its drafting ahead fits the verify
    assert steps.ahead_ms[depth + 1] > steps.target_at(depth + 1)  # one deeper would not
    assert "within the" in ahead.reason and "ahead takes" in ahead.reason
    assert ahead.goodput > taking_turns.goodput  # overlapping pays


@pytest.mark.parametrize("seed", [0, 1])
def test_the_search_matches_brute_force_when_drafting_ahead(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        batch, max_depth = rng.randint(1, 3), rng.randint(1, 4)
        costs = CostModel({
            "target": AnalyticCost(fixed_ms=rng.uniform(1, 30), per_seq_ms=rng.uniform(0, 5),
                                   per_token_ms=rng.uniform(0, 3)),
            "draft": AnalyticCost(fixed_ms=rng.uniform(0, 5), per_token_ms=rng.uniform(0, 12)),
            "overhead": AnalyticCost(fixed_ms=rng.uniform(0, 5)),
        }, ahead_alpha=rng.random())
        alphas = [rng.random() for _ in range(batch)]
        decision = choose_depths(alphas, costs, max_depth)
        best = max(plan_goodput(alphas, plan, costs)
                   for plan in itertools.product(range(max_depth + 1), repeat=batch))
        assert decision.goodput == pytest.approx(plan_goodput(alphas, decision.depths, costs), rel=1e-9)
        assert decision.goodput >= best * (1 - 1e-9)


def test_a_pinned_depth_drafting_ahead_is_predicted_as_the_policy_prices_drafting_ahead() -> None:
    """--depth K with --draft-ahead: the step the router reports and audits is priced as it runs, drafting ahead."""
    pinned = DepthPolicy.fixed(3, defaults=CPU_DRAFT_GPU_TARGET, drafts_ahead=True).choose([(8, 2)])
    searching = DepthPolicy(3, defaults=CPU_DRAFT_GPU_TARGET, drafts_ahead=True).choose([(8, 2)])
    taking_turns = DepthPolicy.fixed(3, defaults=CPU_DRAFT_GPU_TARGET).choose([(8, 2)])
    assert pinned.depths == taking_turns.depths == (3,)
    assert pinned.goodput == pytest.approx(searching.uniform_goodput[3])
    assert pinned.step_ms != pytest.approx(taking_turns.step_ms)
