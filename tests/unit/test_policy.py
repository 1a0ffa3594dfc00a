"""The speculation-depth policy: cost model, acceptance model, and the depth search against brute force."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from specfleet.policy import (
    DEFAULT_COSTS,
    DRAFT_HURDLE,
    MAX_ALPHA,
    MIN_CELL_SAMPLES,
    PADDING_SHARE,
    AnalyticCost,
    CostFn,
    CostModel,
    CostSample,
    DepthPolicy,
    TreePlan,
    acceptance_estimate,
    choose_depths,
    choose_depths_for_latency,
    choose_tree_plan,
    expected_emitted,
    offer_estimate,
    pinned_decision,
    plan_goodput,
    plan_step_ms,
    plan_time_per_token,
    price_step,
)

REL = 1e-9

# A GPU-like curve: verification is nearly free up to a knee of 64 tokens per forward, compute-bound beyond.
SATURATING: dict[str, CostFn] = {
    "target": AnalyticCost(fixed_ms=20.0, per_token_ms=0.01, knee_tokens=64, past_knee_ms=0.4),
    "draft": AnalyticCost(fixed_ms=1.0, per_token_ms=0.05),
    "overhead": AnalyticCost(fixed_ms=2.0),
}


def _random_costs(rng: random.Random) -> CostModel:
    """An analytic model with random coefficients and knee, or a table fitted from random noisy samples."""
    if rng.random() < 0.5:
        return CostModel({
            "target": AnalyticCost(fixed_ms=rng.uniform(1, 30), per_seq_ms=rng.uniform(0, 5),
                                   per_token_ms=rng.uniform(0, 3), knee_tokens=rng.uniform(1, 12),
                                   past_knee_ms=rng.uniform(0, 10)),
            "draft": AnalyticCost(fixed_ms=rng.uniform(0, 5), per_token_ms=rng.uniform(0, 4)),
            "overhead": AnalyticCost(fixed_ms=rng.uniform(0, 5), per_seq_ms=rng.uniform(0, 1)),
        })
    samples = [CostSample(role, rng.randint(1, 3), rng.choice([1, 1.5, 2, 3, 4, 5]), rng.uniform(0.5, 60))
               for role in ("target", "draft", "overhead") for _ in range(rng.randint(1, 12))]
    return CostModel.fit(samples)


def _random_alphas(rng: random.Random, batch: int) -> list[float]:
    return [rng.choice([0.0, MAX_ALPHA, rng.random(), rng.random()]) for _ in range(batch)]


def _all_plans(batch: int, max_depth: int) -> list[tuple[int, ...]]:
    return list(itertools.product(range(max_depth + 1), repeat=batch))


def _brute_force_cases(seed: int) -> list[tuple[list[float], CostModel, int]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(60):
        batch, max_depth = rng.randint(1, 3), rng.randint(0, 4)
        cases.append((_random_alphas(rng, batch), _random_costs(rng), max_depth))
    return cases


# --- depth search against brute force -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_throughput_matches_brute_force(seed: int) -> None:
    for alphas, costs, max_depth in _brute_force_cases(seed):
        decision = choose_depths(alphas, costs, max_depth)
        best = max(plan_goodput(alphas, plan, costs) for plan in _all_plans(len(alphas), max_depth))
        assert decision.goodput == pytest.approx(plan_goodput(alphas, decision.depths, costs), rel=REL)
        assert decision.goodput >= best * (1 - REL), (alphas, max_depth, decision)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uniform_matches_brute_force_over_uniform_plans(seed: int) -> None:
    for alphas, costs, max_depth in _brute_force_cases(seed):
        decision = choose_depths(alphas, costs, max_depth, uniform=True)
        assert len(set(decision.depths)) == 1
        uniform = [plan_goodput(alphas, [d] * len(alphas), costs) for d in range(max_depth + 1)]
        assert decision.uniform_goodput == pytest.approx(uniform, rel=REL)
        assert decision.goodput == pytest.approx(max(uniform), rel=REL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_latency_without_floor_matches_brute_force(seed: int) -> None:
    for alphas, costs, max_depth in _brute_force_cases(seed):
        decision = choose_depths_for_latency(alphas, costs, max_depth)
        best = min(plan_time_per_token(alphas, plan, costs) for plan in _all_plans(len(alphas), max_depth))
        assert decision.time_per_token_ms == pytest.approx(plan_time_per_token(alphas, decision.depths, costs),
                                                           rel=REL)
        assert decision.time_per_token_ms <= best * (1 + REL), (alphas, max_depth, decision)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_latency_floor_is_met_whenever_reachable(seed: int) -> None:
    rng = random.Random(100 + seed)
    for alphas, costs, max_depth in _brute_force_cases(seed):
        plans = _all_plans(len(alphas), max_depth)
        throughput = choose_depths(alphas, costs, max_depth)
        floor = throughput.goodput * rng.choice([0.5, 0.9, 0.99, 1.1])
        decision = choose_depths_for_latency(alphas, costs, max_depth, floor)
        feasible = [p for p in plans if plan_goodput(alphas, p, costs) >= floor]
        if feasible:
            assert decision.goodput >= floor
            # Never slower per token than the goodput-optimal plan, which is itself feasible.
            assert decision.time_per_token_ms <= throughput.time_per_token_ms * (1 + REL)
        else:
            assert decision.goodput == pytest.approx(throughput.goodput, rel=REL)
            assert "unreachable" in decision.reason


def _random_offer_rates(rng: random.Random, batch: int) -> list[float]:
    """Per sequence: always offers (a model drafter), or an n-gram drafter's match rate."""
    return [rng.choice([1.0, rng.uniform(0.05, 1.0), rng.uniform(0.05, 1.0)]) for _ in range(batch)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_offer_rates_keep_the_search_exact(seed: int) -> None:
    rng = random.Random(200 + seed)
    for alphas, costs, max_depth in _brute_force_cases(seed):
        rates = [rng.uniform(0.05, 1.0)] * len(alphas)
        plans = _all_plans(len(alphas), max_depth)
        decision = choose_depths(alphas, costs, max_depth, offer_rates=rates)
        assert decision.goodput == pytest.approx(plan_goodput(alphas, decision.depths, costs, rates), rel=REL)
        assert decision.goodput >= max(plan_goodput(alphas, p, costs, rates) for p in plans) * (1 - REL)
        latency = choose_depths_for_latency(alphas, costs, max_depth, offer_rates=rates)
        best = min(plan_time_per_token(alphas, p, costs, rates) for p in plans)
        assert latency.time_per_token_ms <= best * (1 + REL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unequal_offer_rates_come_within_a_percent_of_brute_force(seed: int) -> None:
    # Greedy by gain per expected verified token: exact at every prefix of that order, and a plan between two
    # prefixes can only be slightly better (the knapsack's one-item gap).
    rng = random.Random(300 + seed)
    for alphas, costs, max_depth in _brute_force_cases(seed):
        rates = _random_offer_rates(rng, len(alphas))
        plans = _all_plans(len(alphas), max_depth)
        decision = choose_depths(alphas, costs, max_depth, offer_rates=rates)
        assert decision.goodput == pytest.approx(plan_goodput(alphas, decision.depths, costs, rates), rel=REL)
        assert decision.goodput >= max(plan_goodput(alphas, p, costs, rates) for p in plans) * 0.99
        latency = choose_depths_for_latency(alphas, costs, max_depth, offer_rates=rates)
        best = min(plan_time_per_token(alphas, p, costs, rates) for p in plans)
        assert latency.time_per_token_ms <= best / 0.99


def test_a_drafter_that_rarely_offers_but_is_accepted_drafts_deep_where_verification_is_cheap() -> None:
    # An n-gram drafter: a match in a quarter of the steps, and then most of its tokens are accepted. Counting the
    # misses as rejections (alpha = accepted / (accepted + rejections + misses)) makes deep drafts look worthless
    # and expensive; with the offer rate a miss costs no verification and deep drafts pay where verification is
    # cheap (a memory-bound batch of 2).
    costs = CostModel(SATURATING)
    accepted, rejections, offers, misses = 300, 75, 100, 300
    lumped = choose_depths([acceptance_estimate(accepted, rejections + misses, 0.5, 0.0)] * 2, costs, 8)
    alpha = acceptance_estimate(accepted, rejections, 0.5, 0.0)
    rate = offer_estimate(offers, misses, 1.0, 0.0)
    split = choose_depths([alpha] * 2, costs, 8, offer_rates=[rate] * 2)
    assert max(lumped.depths) < 8 and split.depths == (8, 8)
    # The verify cost is charged for the drafts expected to come: a quarter of 8 per sequence.
    assert split.step_ms == pytest.approx(price_step(costs.step_costs(2, 8), 8, 2 * 8 * 0.25))


def test_offer_estimate_shrinks_to_the_fleet_rate() -> None:
    assert offer_estimate(0, 0, 0.3, 8.0) == pytest.approx(0.3)
    assert offer_estimate(30, 10, 0.3, 0.0) == pytest.approx(0.75)
    assert offer_estimate(30, 10, 0.3, 8.0) == pytest.approx((30 + 8 * 0.3) / 48)
    assert offer_estimate(0, 50, 0.0, 0.0) > 0  # kept above 0: the search divides by it
    with pytest.raises(ValueError):
        offer_estimate(-1, 0, 0.5, 1.0)


# --- the shape of the choices ---------------------------------------------------------------------------


def test_no_drafting_when_acceptance_is_near_zero() -> None:
    for alphas in ([0.0] * 8, [0.005] * 8):
        assert choose_depths(alphas, CostModel(), 8).depths == (0,) * 8
        assert choose_depths_for_latency(alphas, CostModel(), 8).depths == (0,) * 8


def test_deepest_drafts_when_verification_is_free_and_acceptance_high() -> None:
    free = CostModel({"target": AnalyticCost(fixed_ms=20.0), "draft": AnalyticCost(fixed_ms=0.5, per_token_ms=0.001),
                      "overhead": AnalyticCost(fixed_ms=2.0)})
    assert choose_depths([0.9] * 8, free, 8).depths == (8,) * 8
    # The same acceptance when each verified token costs as much as a fixed step drafts less.
    costly = CostModel({**SATURATING, "target": AnalyticCost(fixed_ms=20.0, per_token_ms=2.5)})
    assert max(choose_depths([0.9] * 8, costly, 8).depths) < 8


def test_a_drafting_step_is_charged_the_overhead_measured_for_drafting_steps() -> None:
    """The router's overhead is recorded by depth: a step that calls the drafters pays their round trip, which a
    plain step does not. Measured at 1 ms without drafting and 25 ms with, it outweighs what alpha 0.5 brings."""
    flat = (_samples("target", {(1, t): 20.0 for t in (1.0, 2.0, 4.0, 9.0)})
            + _samples("draft", {(1, d): 0.5 for d in (1.0, 4.0, 8.0)}))
    drafting_costs = CostModel.fit(flat + _samples("overhead", {(1, 1.0): 1.0, (1, 2.0): 25.0, (1, 5.0): 25.0,
                                                                (1, 9.0): 25.0}))
    assert choose_depths([0.5], drafting_costs, 8).depths == (0,)
    same_costs = CostModel.fit(flat + _samples("overhead", {(1, 1.0 + d): 1.0 for d in (0, 1, 4, 8)}))
    assert choose_depths([0.5], same_costs, 8).depths[0] > 0


def test_best_uniform_depth_falls_as_batch_grows() -> None:
    """The paper's effect: past the knee every verified token costs, so big batches should draft less."""
    costs = CostModel(SATURATING)
    best = []
    for batch in (1, 2, 4, 8, 16, 32, 64, 128):
        decision = choose_depths([0.7] * batch, costs, 8, uniform=True)
        best.append(decision.depths[0])
        assert decision.goodput == max(decision.uniform_goodput)
    assert best == sorted(best, reverse=True), best
    assert best[0] >= 6 and best[-1] <= 1, best
    # The CPU defaults show it too, more gently.
    cpu = [choose_depths([0.6] * b, CostModel(), 8, uniform=True).depths[0] for b in (1, 4, 16)]
    assert cpu == sorted(cpu, reverse=True) and cpu[0] > cpu[-1], cpu


def test_poorly_accepting_sequences_get_less_depth() -> None:
    alphas = [0.9, 0.2, 0.8, 0.4, 0.9, 0.1]
    for costs in (CostModel(), CostModel(SATURATING)):
        depths = choose_depths(alphas, costs, 8).depths
        for (a, da), (b, db) in itertools.combinations(zip(alphas, depths, strict=True), 2):
            if a > b:
                assert da >= db, (alphas, depths)
        assert depths[0] > depths[1]


def test_per_sequence_plan_beats_or_ties_every_uniform_plan() -> None:
    decision = choose_depths([0.95, 0.5, 0.1, 0.7], CostModel(), 8)
    assert len(set(decision.depths)) > 1
    assert decision.goodput >= max(decision.uniform_goodput)
    assert "vs uniform 0:" in decision.reason


def test_a_mixed_plan_pays_for_padding_its_rows_to_the_widest() -> None:
    """Depths 0 and 8 verify as many drafts as 4 and 4, but the target pads the short row to the long one:
    the plan is charged `PADDING_SHARE` of the 8 padded tokens on top."""
    costs = CostModel({"target": AnalyticCost(fixed_ms=10.0, per_token_ms=1.0), "draft": AnalyticCost(),
                       "overhead": AnalyticCost()})
    target = costs.step_costs(2, 8).target_at
    assert plan_step_ms(costs, [4, 4]) == pytest.approx(target(8))
    assert plan_step_ms(costs, [0, 8]) == pytest.approx(target(8 + PADDING_SHARE * 8))
    # An n-gram drafter that offers half the time: half as much padding is expected.
    assert plan_step_ms(costs, [0, 8], [0.5, 0.5]) == pytest.approx(target(4 + PADDING_SHARE * 4))


def test_similar_acceptance_gets_one_depth_for_all() -> None:
    """Sequences a little apart in acceptance gain a few percent from depths of their own, less than the
    ragged verification costs; sequences far apart still get their own depths."""
    for batch in (8, 32):
        alphas = [0.62 + 0.2 * i / batch for i in range(batch)]
        assert len(set(choose_depths(alphas, CostModel(), 8).depths)) == 1
    assert len(set(choose_depths([0.9] * 4 + [0.05] * 4, CostModel(), 8).depths)) == 2


def test_a_predicted_gain_under_the_hurdle_decodes_plainly() -> None:
    """Drafting predicted a few percent above plain decoding is within the cost model's error: with `min_gain`
    the batch decodes plainly, and the reason says what drafting would have gained. A large gain still drafts."""
    alphas = [0.25] * 32
    exact = choose_depths(alphas, CostModel(), 8)
    gain = exact.goodput / exact.uniform_goodput[0] - 1
    assert max(exact.depths) > 0 and 0 < gain < DRAFT_HURDLE
    held = choose_depths(alphas, CostModel(), 8, min_gain=DRAFT_HURDLE)
    assert held.depths == (0,) * 32 and held.goodput == pytest.approx(held.uniform_goodput[0])
    assert f"would gain {gain:.0%}, under the 10% hurdle" in held.reason
    assert choose_depths(alphas, CostModel(), 8, min_gain=gain / 2).depths == exact.depths
    assert choose_depths(alphas, CostModel(), 8, min_gain=DRAFT_HURDLE, uniform=True).depths == (0,) * 32
    assert choose_depths_for_latency(alphas, CostModel(), 8, min_gain=DRAFT_HURDLE).depths == (0,) * 32
    clear = [0.7] * 32
    assert choose_depths(clear, CostModel(), 8, min_gain=DRAFT_HURDLE) == choose_depths(clear, CostModel(), 8)
    # Plain decoding below the latency mode's floor: drafting stays, whatever the hurdle.
    floor = 1.02 * exact.uniform_goodput[0]
    assert any(choose_depths_for_latency(alphas, CostModel(), 8, floor, min_gain=DRAFT_HURDLE).depths)
    with pytest.raises(ValueError, match="min_gain"):
        choose_depths(alphas, CostModel(), 8, min_gain=-0.1)


def test_the_hurdle_scales_the_predicted_gain_by_the_measured_calibration() -> None:
    """A calibration below 1 (drafting steps measured worse than predicted) can hold back a plan the hurdle alone
    lets through; one above 1 can let through a plan the hurdle alone holds back. It moves only that test: the plan
    and its predictions are the model's own."""
    alphas = [0.25] * 32
    exact = choose_depths(alphas, CostModel(), 8)
    gain = exact.goodput / exact.uniform_goodput[0] - 1  # a few percent
    low = choose_depths(alphas, CostModel(), 8, min_gain=gain / 2, calibration=0.97)
    assert low.depths == (0,) * 32 and "(x0.97 as drafting steps measured), under the" in low.reason
    high = choose_depths(alphas, CostModel(), 8, min_gain=DRAFT_HURDLE, calibration=1.1)
    assert high.depths == choose_depths(alphas, CostModel(), 8, min_gain=DRAFT_HURDLE / 3).depths
    assert high.depths == exact.depths and high.goodput == exact.goodput
    assert high.reason.endswith("; gain x1.10 as drafting steps measured")
    assert choose_depths_for_latency(alphas, CostModel(), 8, min_gain=DRAFT_HURDLE, calibration=1.2).depths \
        == choose_depths_for_latency(alphas, CostModel(), 8).depths
    # Even with no hurdle, a plan measured to lose gives way to plain decoding.
    assert choose_depths(alphas, CostModel(), 8, calibration=0.9).depths == (0,) * 32
    assert choose_depths(alphas, CostModel(), 8, calibration=1.0) == exact
    candidates = [[TreePlan(0, ())] * 32, [TreePlan(1, (1,))] * 32]
    assert choose_tree_plan(alphas, CostModel(), candidates, min_gain=DRAFT_HURDLE, calibration=1.2).index == 1
    assert choose_tree_plan(alphas, CostModel(), candidates, calibration=0.9).index == 0
    with pytest.raises(ValueError, match="calibration"):
        choose_depths(alphas, CostModel(), 8, calibration=0.0)


def test_a_tree_is_priced_as_a_chain_with_as_many_tokens() -> None:
    """Depth plans and tree budgets share `price_step`: a candidate of chains costs and yields what the same depth
    plan does, and a tree of n nodes is verified as n tokens, drafted and overheaded at its levels."""
    rng = random.Random(400)
    for alphas, costs, max_depth in _brute_force_cases(0):
        rates = _random_offer_rates(rng, len(alphas))
        depths = [rng.randint(0, max_depth) for _ in alphas]
        chains = choose_tree_plan(alphas, costs, [[TreePlan(d, (1,) * d) for d in depths]], rates)
        assert chains.step_ms == pytest.approx(plan_step_ms(costs, depths, rates), rel=REL)
        assert chains.goodput == pytest.approx(plan_goodput(alphas, depths, costs, rates), rel=REL)
        tree = choose_tree_plan(alphas, costs, [[TreePlan(6, (3, 2))] * len(alphas)])
        assert tree.step_ms == price_step(costs.step_costs(len(alphas), 6), 2, 6.0 * len(alphas))


def test_a_tree_budget_under_the_hurdle_gives_way_to_plain_decoding() -> None:
    batch = 32
    candidates = [[TreePlan(0, ())] * batch, [TreePlan(1, (1,))] * batch]
    exact = choose_tree_plan([0.25] * batch, CostModel(), candidates)
    assert exact.index == 1
    held = choose_tree_plan([0.25] * batch, CostModel(), candidates, min_gain=DRAFT_HURDLE)
    assert held.index == 0 and "under the 10% hurdle" in held.reason
    assert choose_tree_plan([0.7] * batch, CostModel(), candidates, min_gain=DRAFT_HURDLE).index == 1


def test_limits_cap_each_sequence() -> None:
    decision = choose_depths([0.9, 0.9, 0.9], CostModel(SATURATING), 8, limits=[8, 2, 0])
    assert decision.depths == (8, 2, 0)
    assert pinned_decision([0.9, 0.9], CostModel(), 5, limits=[3, 9]).depths == (3, 5)


# --- latency mode ---------------------------------------------------------------------------------------


def test_latency_mode_evens_out_depth_across_sequences() -> None:
    """One good and one poor sequence: throughput drafts deep for the good one only; latency, which
    averages each sequence's time per token, drafts less for the good one (its depth slows the poor
    one's every token) and more for the poor one."""
    alphas, costs = [0.95, 0.05], CostModel()
    throughput = choose_depths(alphas, costs, 8)
    latency = choose_depths_for_latency(alphas, costs, 8)
    assert throughput.depths == (8, 0)
    assert latency.depths[0] < throughput.depths[0] and latency.depths[1] > throughput.depths[1]
    assert latency.time_per_token_ms < throughput.time_per_token_ms
    assert latency.goodput < throughput.goodput
    # Identical sequences: the two objectives agree.
    same = [0.7] * 4
    assert choose_depths_for_latency(same, costs, 8).depths == choose_depths(same, costs, 8).depths


def test_latency_mode_honours_the_floor() -> None:
    alphas, costs = [0.95, 0.05], CostModel()
    throughput = choose_depths(alphas, costs, 8)
    free = choose_depths_for_latency(alphas, costs, 8)
    floor = (free.goodput + throughput.goodput) / 2
    bound = choose_depths_for_latency(alphas, costs, 8, floor)
    assert bound.goodput >= floor
    assert free.time_per_token_ms <= bound.time_per_token_ms <= throughput.time_per_token_ms
    assert "met" in bound.reason
    unreachable = choose_depths_for_latency(alphas, costs, 8, throughput.goodput * 1.5)
    assert unreachable.depths == throughput.depths and "unreachable" in unreachable.reason


def test_latency_uniform_mode() -> None:
    alphas, costs = [0.95, 0.05, 0.5], CostModel()
    decision = choose_depths_for_latency(alphas, costs, 6, uniform=True)
    times = [plan_time_per_token(alphas, [d] * 3, costs) for d in range(7)]
    assert decision.time_per_token_ms == pytest.approx(min(times), rel=REL)


# --- cost model -----------------------------------------------------------------------------------------


def _samples(role: str, points: dict[tuple[int, float], float]) -> list[CostSample]:
    """Each point measured often enough to count (`MIN_CELL_SAMPLES` times)."""
    return [CostSample(role, b, t, ms) for (b, t), ms in points.items() for _ in range(MIN_CELL_SAMPLES)]


def test_cost_model_defaults_match_the_documented_cpu_numbers() -> None:
    costs = CostModel()
    assert costs.fitted_roles == {}
    target = DEFAULT_COSTS["target"]
    for role in ("target", "draft", "overhead"):
        assert costs.predict(role, 4, 3.0) == DEFAULT_COSTS[role](4, 3.0)
    assert target(1, 1) == pytest.approx(25, rel=0.02)
    assert target(1, 8) / target(1, 1) == pytest.approx(1.45, rel=0.02)
    assert target(16, 8) / target(16, 1) == pytest.approx(2.2, rel=0.02)
    assert costs.predict("draft", 1, 8) == pytest.approx(1.0, rel=0.1)
    assert costs.predict("overhead", 1, 1) == pytest.approx(3.0)


def test_cost_model_interpolates_between_grid_points() -> None:
    costs = CostModel.fit(_samples("target", {(4, 1): 10.0, (4, 2): 20.0, (8, 1): 30.0, (8, 2): 40.0}))
    assert costs.fitted_roles == {"target": 4 * MIN_CELL_SAMPLES}
    assert costs.predict("target", 4, 1) == pytest.approx(10)
    assert costs.predict("target", 4, 1.5) == pytest.approx(15)
    assert costs.predict("target", 6, 1) == pytest.approx(20)
    assert costs.predict("target", 6, 1.5) == pytest.approx(25)
    assert costs.predict("target", 8, 2) == pytest.approx(40)
    assert costs.predict("draft", 4, 1) == DEFAULT_COSTS["draft"](4, 1)  # other roles keep their defaults


def test_cost_model_medians_resist_outliers() -> None:
    samples = [CostSample("target", 2, 3.0, ms) for ms in (20.0, 21.0, 19.0, 20.0, 900.0, 20.5)]
    samples += [CostSample("target", 2, 3.1, 0.0)]  # the same 0.5-token cell
    costs = CostModel.fit(samples)
    assert costs.predict("target", 2, 3.0) == pytest.approx(20.0)


def test_cost_model_fits_a_handful_of_samples() -> None:
    """Three target samples at batch 1, one token: that point is exact; elsewhere the default's shape
    at the measured level (here 1.2x the default)."""
    level = 1.2 * DEFAULT_COSTS["target"](1, 1.0)
    costs = CostModel.fit([CostSample("target", 1, 1.0, level * f) for f in (0.98, 1.0, 1.03)])
    assert costs.predict("target", 1, 1.0) == pytest.approx(level)
    for batch, tokens in [(1, 5.0), (16, 3.0), (300, 9.0), (3, 40.0)]:
        assert costs.predict("target", batch, tokens) == pytest.approx(1.2 * DEFAULT_COSTS["target"](batch, tokens))


def test_one_slow_call_does_not_price_a_depth_out() -> None:
    """A single slow sample in an otherwise unmeasured cell is not a measurement: the policy would stop choosing
    that depth and never measure it again. From its third sample on, the cell's median counts."""
    plain = [CostSample("target", 1, 1.0, 40.0)] * 50
    costs = CostModel.fit([*plain, CostSample("target", 1, 4.0, 400.0)])
    assert costs.predict("target", 1, 4.0) < 60.0
    assert choose_depths([0.7], costs, 8).depths[0] > 0
    measured = CostModel.fit([*plain, *[CostSample("target", 1, 4.0, 400.0)] * MIN_CELL_SAMPLES])
    assert measured.predict("target", 1, 4.0) == pytest.approx(400.0)


def test_cost_model_extrapolates_deeper_with_the_measured_slope() -> None:
    costs = CostModel.fit(_samples("target", {(4, 1.0): 500.0, (4, 2.0): 1000.0, (4, 3.0): 1500.0}))
    assert costs.predict("target", 4, 9.0) == pytest.approx(4500.0)
    assert costs.predict("target", 4, 2.5) == pytest.approx(1250.0)
    # A noisy decrease is not extrapolated: the two cells pool to their mean, and stay flat.
    flat = CostModel.fit(_samples("target", {(4, 1.0): 50.0, (4, 2.0): 48.0}))
    assert flat.predict("target", 4, 1.0) == flat.predict("target", 4, 9.0) == pytest.approx(49.0)


def test_a_few_slow_calls_do_not_outweigh_a_well_measured_cheaper_cell() -> None:
    """Within a batch size the fit is monotone in tokens, weighted by samples: three slow calls at 2 tokens,
    against hundreds at 1 token and four cheap ones at 4 tokens, pool with the cheap ones instead of setting
    every deeper depth's price."""
    samples = ([CostSample("target", 1, 1.0, 60.0)] * 300 + [CostSample("target", 1, 2.0, 113.0)] * 3
               + [CostSample("target", 1, 4.0, 52.0)] * 4)
    costs = CostModel.fit(samples)
    assert costs.predict("target", 1, 1.0) == pytest.approx(60.0)
    assert costs.predict("target", 1, 2.0) == costs.predict("target", 1, 4.0) == pytest.approx((3 * 113 + 4 * 52) / 7)
    assert choose_depths([0.5], costs, 8).depths[0] > 0


def test_a_ragged_verify_is_filed_under_the_tokens_its_plan_is_priced_at() -> None:
    """Prompt lookup's ragged steps (mean 2 tokens a sequence, one row 6 wide) cost more than uniform steps of 3
    tokens, since the target pads attention to the widest rows (the numbers: a 7K x 8 run on the 2-core CPU).
    Filed under their mean, the monotone fit pools them with the uniform 3-token cell and a uniform depth-2 plan
    looks dearer than it measured; filed under the tokens `verified_drafts` prices such a ragged plan at, they
    leave it alone, and a ragged plan is still priced from them."""
    uniform = [CostSample("target", 8, 1.0, 310.0, 7200.0)] * 60 + [CostSample("target", 8, 3.0, 453.0, 7200.0)] * 30
    ragged = [CostSample("target", 8, 2.0, 555.0, 7200.0, widest=6.0)] * 7
    assert ragged[0].priced_tokens == pytest.approx(PADDING_SHARE * 6 + (1 - PADDING_SHARE) * 2)
    costs = CostModel.fit(uniform + ragged)
    assert costs.predict("target", 8, 3.0, 7200.0) == pytest.approx(453.0)
    assert costs.predict("target", 8, 3.5, 7200.0) == pytest.approx(555.0)  # their cell: 3.6 tokens, bucketed
    # The same calls without their widest row: the uniform plan's price is pulled up to theirs.
    unaware = CostModel.fit(uniform + [CostSample("target", 8, 2.0, 555.0, 7200.0)] * 7)
    assert unaware.predict("target", 8, 3.0, 7200.0) == pytest.approx((30 * 453 + 7 * 555) / 37)
    with pytest.raises(ValueError, match="widest"):
        CostSample("target", 8, 2.0, 555.0, widest=1.5)


def test_a_few_slow_calls_at_a_small_batch_do_not_price_a_larger_one() -> None:
    """Across batch sizes the fit is monotone too, weighted by samples: three slow calls at batch 4 (a tail, a
    pause) pool with hundreds at batch 8 instead of lifting batch 8 to them."""
    samples = [CostSample("target", 8, 1.0, 80.0)] * 300 + [CostSample("target", 4, 1.0, 115.0)] * 3
    costs = CostModel.fit(samples)
    pooled = (300 * 80 + 3 * 115) / 303
    assert costs.predict("target", 8, 1.0) == costs.predict("target", 4, 1.0) == pytest.approx(pooled)


def test_cost_model_fills_unmeasured_cells_sensibly() -> None:
    # Measured at one token for batch 1 and 16: between them linear, and deeper drafts cost more.
    costs = CostModel.fit(_samples("target", {(1, 1.0): 30.0, (16, 1.0): 120.0}))
    assert costs.predict("target", 8, 1.0) == pytest.approx(30 + (120 - 30) * 7 / 15)
    for batch in (1, 8, 16):
        assert costs.predict("target", batch, 1.0) < costs.predict("target", batch, 5.0)
    ratio = costs.predict("target", 16, 5.0) / DEFAULT_COSTS["target"](16, 5.0)
    assert ratio == pytest.approx(120.0 / DEFAULT_COSTS["target"](16, 1.0))


# Costlier per drafted token than the default says: a CPU well past its knee at large batch sizes.
STEEP_TARGET = AnalyticCost(fixed_ms=16.7, per_seq_ms=4.0, per_token_ms=3.0)


def _steep_rows(batches: tuple[int, ...], plain_only: int) -> CostModel:
    """Target samples from `STEEP_TARGET`: at 1-8 tokens for `batches`, at one token only for `plain_only`."""
    points = {(b, float(t)): STEEP_TARGET(b, t) for b in batches for t in range(1, 9)}
    return CostModel.fit(_samples("target", {**points, (plain_only, 1.0): STEEP_TARGET(plain_only, 1.0)}))


def test_a_batch_size_measured_only_at_plain_decoding_borrows_its_neighbours_shape() -> None:
    """A batch size the fleet passes through (a few requests just finished) is measured at one token: deeper,
    it costs what the measured batch sizes around it say, not the default's far cheaper shape, and the policy
    decides there as it would with the true costs."""
    costs = _steep_rows((16, 32), plain_only=29)
    for tokens in (2.0, 4.0, 7.0, 9.0, 12.0):
        assert costs.predict("target", 29, tokens) == pytest.approx(STEEP_TARGET(29, tokens), rel=0.01)
    true_costs = CostModel({**DEFAULT_COSTS, "target": STEEP_TARGET})
    for alpha in (0.3, 0.6, 0.8):
        chosen = choose_depths([alpha] * 29, costs, 8, min_gain=DRAFT_HURDLE).depths
        assert chosen == choose_depths([alpha] * 29, true_costs, 8, min_gain=DRAFT_HURDLE).depths, alpha


def test_a_batch_size_past_every_measured_shape_scales_the_nearest_one() -> None:
    """Above every batch size measured at several depths: the nearest one's shape, moved as the default moves."""
    costs = _steep_rows((8, 16), plain_only=24)
    for tokens in (2.0, 7.0, 12.0):
        assert costs.predict("target", 24, tokens) == pytest.approx(STEEP_TARGET(24, tokens), rel=0.02)
        default_shape = STEEP_TARGET(24, 1.0) * DEFAULT_COSTS["target"](24, tokens) / DEFAULT_COSTS["target"](24, 1.0)
        assert default_shape < 0.9 * STEEP_TARGET(24, tokens)  # what the fit would be without its neighbours


def test_cost_model_is_monotone() -> None:
    rng = random.Random(7)
    # Noisy, non-monotone samples: costs drawn at random, ignoring batch and tokens.
    samples = [CostSample(role, rng.choice([1, 2, 3, 5, 8, 12, 32]), rng.choice([1, 1.5, 2, 4, 7, 9]),
                          rng.uniform(1, 100)) for role in ("target", "draft", "overhead") for _ in range(80)]
    costs = CostModel.fit(samples)
    batches = [1, 2, 3, 4, 5, 7, 8, 10, 12, 20, 32, 64, 256, 400]
    tokens = [0.5, 1, 1.25, 1.5, 2, 3, 4, 5.5, 7, 8, 9, 12, 20, 33, 40]
    for role in ("target", "draft", "overhead"):
        grid = [[costs.predict(role, b, t) for t in tokens] for b in batches]
        for row in grid:
            assert all(x >= 0 for x in row)
            assert all(a <= b * (1 + 1e-12) for a, b in itertools.pairwise(row)), (role, row)
        for col in zip(*grid, strict=True):
            assert all(a <= b * (1 + 1e-12) for a, b in itertools.pairwise(col)), (role, col)


def test_cost_sample_and_model_validate() -> None:
    with pytest.raises(ValueError, match="role"):
        CostSample("verify", 1, 1.0, 1.0)
    with pytest.raises(ValueError, match="batch_size"):
        CostSample("target", 0, 1.0, 1.0)
    with pytest.raises(ValueError, match="ms"):
        CostSample("target", 1, 1.0, math.nan)
    with pytest.raises(ValueError, match="missing"):
        CostModel({"target": AnalyticCost()})


# --- acceptance model -----------------------------------------------------------------------------------


def test_acceptance_estimate_shrinks_toward_the_prior() -> None:
    assert acceptance_estimate(0, 0, 0.6, 8.0) == pytest.approx(0.6)
    assert acceptance_estimate(9, 1, 0.6, 0.0) == pytest.approx(0.9)
    assert acceptance_estimate(9, 1, 0.6, 10.0) == pytest.approx((9 + 6) / 20)
    few, many = acceptance_estimate(9, 1, 0.5, 8.0), acceptance_estimate(900, 100, 0.5, 8.0)
    assert 0.5 < few < many < 0.9


def test_acceptance_estimate_bounds() -> None:
    assert acceptance_estimate(10**6, 0, 0.9, 1.0) == MAX_ALPHA
    assert acceptance_estimate(0, 50, 0.0, 4.0) == 0.0
    assert acceptance_estimate(0, 0, 1.0, 4.0) == MAX_ALPHA
    with pytest.raises(ValueError):
        acceptance_estimate(-1, 0, 0.5, 1.0)


def _simulate_step(rng: random.Random, alpha: float, depth: int) -> int:
    """Accepted draft tokens in one step: i.i.d. acceptance, stopping at the first rejection."""
    accepted = 0
    while accepted < depth and rng.random() < alpha:
        accepted += 1
    return accepted


def test_acceptance_estimate_is_unbiased_where_accepted_over_proposed_is_not() -> None:
    rng, alpha, depth = random.Random(3), 0.7, 8
    steps = [_simulate_step(rng, alpha, depth) for _ in range(20000)]
    accepted = sum(steps)
    rejections = sum(a < depth for a in steps)
    assert acceptance_estimate(accepted, rejections, 0.5, 0.0) == pytest.approx(alpha, abs=0.01)
    assert accepted / (depth * len(steps)) < alpha - 0.2


def test_expected_emitted_closed_form() -> None:
    assert expected_emitted(0.7, 0) == 1.0
    assert expected_emitted(0.0, 5) == 1.0
    assert expected_emitted(1.0, 5) == 6.0
    assert expected_emitted(0.5, 2) == pytest.approx(1.75)
    with pytest.raises(ValueError):
        expected_emitted(1.5, 2)


@pytest.mark.parametrize(("alpha", "depth"), [(0.3, 1), (0.7, 4), (0.9, 8), (0.99, 16)])
def test_expected_emitted_matches_simulation(alpha: float, depth: int) -> None:
    rng = random.Random(int(alpha * 100) + depth)
    trials = 20000
    mean = sum(_simulate_step(rng, alpha, depth) + 1 for _ in range(trials)) / trials
    assert mean == pytest.approx(expected_emitted(alpha, depth), rel=0.03)


@pytest.mark.parametrize(("alpha", "depth", "offer_rate"), [(0.8, 8, 0.25), (0.5, 3, 0.6)])
def test_expected_emitted_with_misses_matches_simulation(alpha: float, depth: int, offer_rate: float) -> None:
    rng = random.Random(depth)
    trials = 20000
    mean = sum(1 + (_simulate_step(rng, alpha, depth) if rng.random() < offer_rate else 0)
               for _ in range(trials)) / trials
    assert mean == pytest.approx(expected_emitted(alpha, depth, offer_rate), rel=0.03)


# --- the policy object ----------------------------------------------------------------------------------


def test_policy_update_swaps_model_and_fleet_rate() -> None:
    policy = DepthPolicy(max_depth=8)
    before = policy.costs
    assert policy.fleet_alpha == policy.default_alpha
    slow_target = [CostSample("target", 4, t, 500.0 * t) for t in (1.0, 2.0, 3.0) for _ in range(3)]
    policy.update(slow_target, fleet_accepted=900, fleet_rejections=100)
    assert policy.costs is not before
    assert policy.costs.fitted_roles == {"target": 9}
    assert policy.fleet_alpha == pytest.approx(acceptance_estimate(900, 100, 0.5, policy.prior_weight))
    # Verification now costs 500 ms a token per sequence: drafting never pays.
    assert policy.choose([(90, 10)] * 4).depths == (0, 0, 0, 0)


def test_policy_learns_the_fleet_offer_rate_and_each_sequence_its_own() -> None:
    policy = DepthPolicy(max_depth=8, defaults=SATURATING)
    assert policy.fleet_offer_rate == 1.0  # before any telemetry: drafters offer when asked
    policy.update([], fleet_accepted=800, fleet_rejections=200, fleet_offers=250, fleet_misses=750)
    assert policy.fleet_offer_rate == pytest.approx(offer_estimate(250, 750, 1.0, policy.prior_weight))
    assert policy.offer_rates([(0, 0), (90, 10), (0, 100)]) == pytest.approx(
        [policy.fleet_offer_rate, offer_estimate(90, 10, policy.fleet_offer_rate, policy.prior_weight),
         offer_estimate(0, 100, policy.fleet_offer_rate, policy.prior_weight)])
    counts = [(400, 100)] * 2
    assert policy.choose(counts).goodput == pytest.approx(
        policy.choose(counts, offer_counts=[(0, 0)] * 2).goodput)  # no counts: the fleet's rate
    with pytest.raises(ValueError, match="offer_counts"):
        policy.choose(counts, offer_counts=[(1, 1)])


def test_policy_choose_per_sequence() -> None:
    policy = DepthPolicy(max_depth=8)
    policy.update([], fleet_accepted=600, fleet_rejections=400)
    decision = policy.choose([(950, 50), (5, 95), (0, 0)])
    assert decision.depths[0] > decision.depths[2] >= decision.depths[1]  # the new one sits at the fleet rate
    assert policy.choose([]).depths == ()


def test_policy_modes() -> None:
    counts = [(950, 50), (5, 95)]
    latency = DepthPolicy(max_depth=8, mode="latency").choose(counts)
    throughput = DepthPolicy(max_depth=8).choose(counts)
    assert latency.time_per_token_ms < throughput.time_per_token_ms
    uniform = DepthPolicy(max_depth=8, uniform=True).choose(counts)
    assert len(set(uniform.depths)) == 1
    with pytest.raises(ValueError, match="mode"):
        DepthPolicy(max_depth=4, mode="fast")


def test_policy_passes_its_hurdle_on() -> None:
    counts = [(60, 40)] * 4
    assert any(DepthPolicy(max_depth=8).choose(counts).depths)
    assert DepthPolicy(max_depth=8, min_gain=100.0).choose(counts).depths == (0,) * 4
    assert DepthPolicy.fixed(3).choose(counts).depths == (3,) * 4  # a pinned depth ignores it
    assert DepthPolicy(max_depth=8).choose(counts, calibration=0.05).depths == (0,) * 4
    assert DepthPolicy.fixed(3).choose(counts, calibration=0.05).depths == (3,) * 4
    with pytest.raises(ValueError, match="min_gain"):
        DepthPolicy(max_depth=4, min_gain=-1.0)


def test_fixed_policy_pins_the_depth_and_still_predicts() -> None:
    decision = DepthPolicy.fixed(3).choose([(0, 100), (100, 0)])
    assert decision.depths == (3, 3)
    assert len(decision.uniform_goodput) == 4
    assert decision.goodput == pytest.approx(decision.uniform_goodput[3])
    assert decision.reason.startswith("pinned depth 3")
    assert DepthPolicy.fixed(0).choose([(5, 5)]).depths == (0,)
