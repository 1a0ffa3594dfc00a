"""Context length in the cost model (MagicDec): the KV term's fit, predictions monotone in every argument, depths
that rise with context and, at long context, with batch, cross-checked against brute force with the same pricing,
and the contexts the router and the services hand it."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from step_fakes import live_request

from router.planner import Planner
from router.policy_feed import PolicyFeed
from specfleet.config import RouterConfig
from specfleet.policy import (
    DEFAULT_COSTS,
    MIN_CELL_SAMPLES,
    REFERENCE_CONTEXT,
    AnalyticCost,
    ContextCost,
    CostFn,
    CostModel,
    CostSample,
    DepthPolicy,
    TreePlan,
    choose_depths,
    choose_depths_for_latency,
    choose_tree_plan,
    context_bucket,
    plan_goodput,
    plan_step_ms,
    plan_time_per_token,
)
from specfleet.telemetry import LatencySample, _cost_sample_from_fields, _latency_fields

REL = 1e-9
KV_MS = 0.002  # ms per KV token a verify reads, per sequence


def _sparse_draft(batch: int, tokens_per_seq: float) -> float:
    """A draft over a fixed window + sink cache: each level one forward, its weight load shared by the batch, and
    nothing that grows with the context."""
    return tokens_per_seq * (4.0 + 0.05 * batch)


# Verify grows with batch x context, the draft does not: MagicDec's regime.
LONG_CONTEXT: dict[str, CostFn] = {
    "target": AnalyticCost(fixed_ms=20.0, per_seq_ms=0.2, per_token_ms=0.05, per_kv_ms=KV_MS),
    "draft": _sparse_draft,
    "overhead": AnalyticCost(fixed_ms=2.0),
}
CONTEXTS = [0, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
BATCHES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]


def _truth(role: str, batch: int, tokens: float, context: float) -> float:
    """The synthetic costs the samples below measure: `LONG_CONTEXT` with the target's KV read from context 0."""
    kv = KV_MS * batch * context if role == "target" else 0.0
    return LONG_CONTEXT[role](batch, tokens) + kv


def _samples(rng: random.Random, noise: float = 0.0, outliers: float = 0.0) -> list[CostSample]:
    """Samples of every role at several batch sizes, depths and contexts, `MIN_CELL_SAMPLES` a cell and context,
    each ms off by up to `noise` (relative), a share `outliers` of them 5x slow (a pause, a cold cache)."""
    samples = []
    for batch, depth, context in itertools.product([1, 2, 4, 8, 16], range(1, 13), [256, 1024, 4096, 16384]):
        for role, tokens in (("target", 1.0 + depth), ("draft", float(depth)), ("overhead", 1.0 + depth)):
            seen = 0.0 if role == "overhead" else float(context)  # the router's overhead reads no KV
            for _ in range(MIN_CELL_SAMPLES):
                ms = _truth(role, batch, tokens, context) * (1 + rng.uniform(-noise, noise))
                samples.append(CostSample(role, batch, tokens, ms * (5 if rng.random() < outliers else 1), seen))
    return samples


# --- fitting the KV term ---------------------------------------------------------------------------------


def test_fit_recovers_the_kv_slope_and_the_costs_it_was_measured_at() -> None:
    model = CostModel.fit(_samples(random.Random(0)), LONG_CONTEXT)
    target = model.context_cost("target")
    assert target.fitted and target.per_kv_ms == pytest.approx(KV_MS, rel=1e-9) and target.reference == 256
    for batch, depth, context in [(1, 1, 256), (4, 3, 1024), (16, 12, 16384), (8, 5, 4096)]:
        assert model.predict("target", batch, 1.0 + depth, context) == pytest.approx(
            _truth("target", batch, 1.0 + depth, context), rel=1e-9)
    # Between and past the measured contexts, the KV term is linear in context.
    assert model.predict("target", 4, 3.0, 50_000) == pytest.approx(_truth("target", 4, 3.0, 50_000), rel=1e-9)


def test_fit_recovers_the_kv_slope_through_noise_and_outliers() -> None:
    model = CostModel.fit(_samples(random.Random(1), noise=0.05, outliers=0.1), LONG_CONTEXT)
    assert model.context_cost("target").per_kv_ms == pytest.approx(KV_MS, rel=0.1)
    assert model.context_cost("draft").per_kv_ms < 0.05 * KV_MS  # about 0: medians of noise around a flat cost


def test_a_role_whose_cost_does_not_grow_with_context_fits_about_zero() -> None:
    model = CostModel.fit(_samples(random.Random(2)), LONG_CONTEXT)
    draft = model.context_cost("draft")
    assert draft.fitted and draft.per_kv_ms == 0.0
    assert model.predict("draft", 8, 6.0, 100_000) == pytest.approx(_sparse_draft(8, 6.0), rel=1e-9)
    # The overhead's samples all say 0: nothing to fit, its default (none) stands, and context changes nothing.
    overhead = model.context_cost("overhead")
    assert not overhead.fitted and overhead.per_kv_ms == 0.0 and overhead.reference == 0.0
    assert model.predict("overhead", 8, 3.0, 100_000) == model.predict("overhead", 8, 3.0)


def test_slope_is_never_negative() -> None:
    # Costs that fall with context (noise, or a cache warming up) must not make long contexts look cheap.
    samples = [CostSample("target", 2, 2.0, 50.0 - 0.001 * c, float(c)) for c in (256, 1024, 4096)
               for _ in range(MIN_CELL_SAMPLES)]
    model = CostModel.fit(samples)
    assert model.context_cost("target").per_kv_ms == 0.0
    assert model.predict("target", 2, 2.0, 4096) == pytest.approx(model.predict("target", 2, 2.0, 256))


def test_one_context_or_none_fits_the_table_as_before_and_keeps_the_default_slope() -> None:
    rng = random.Random(3)
    plain = [CostSample(role, rng.randint(1, 4), rng.choice([1, 1.5, 2, 3, 5]), rng.uniform(1, 60))
             for role in ("target", "draft", "overhead") for _ in range(40)]
    at_one = [CostSample(s.role, s.batch_size, s.tokens_per_seq, s.ms, 900.0) for s in plain]
    before, after = CostModel.fit(plain), CostModel.fit(at_one)
    for role, batch, tokens in itertools.product(("target", "draft", "overhead"), [1, 2, 3, 4, 7, 64],
                                                 [1, 1.5, 2.5, 4, 9, 30]):
        assert after.predict(role, batch, tokens) == before.predict(role, batch, tokens)  # None: the reference
        assert after.predict(role, batch, tokens, 900) == before.predict(role, batch, tokens)
        assert before.predict(role, batch, tokens, REFERENCE_CONTEXT) == before.predict(role, batch, tokens)
    # No sample spans two contexts: the default's slope, from the samples' context (900) or the default's (256).
    default_kv = DEFAULT_COSTS["target"].per_kv_ms  # type: ignore[attr-defined]
    assert after.context_cost("target").per_kv_ms == before.context_cost("target").per_kv_ms == default_kv > 0
    assert (after.context_cost("target").reference, before.context_cost("target").reference) == (900, 256)
    past = before.predict("target", 2, 3.0) + 2 * 1000 * default_kv  # 1000 tokens past 900, at batch 2
    assert after.predict("target", 2, 3.0, 1900) == pytest.approx(past)


def test_samples_without_a_context_count_as_measured_at_the_reference() -> None:
    known = _samples(random.Random(4))
    old = [CostSample("target", 2, 3.0, _truth("target", 2, 3.0, 256.0)) for _ in range(20)]  # an older writer
    model = CostModel.fit(known + old, LONG_CONTEXT)
    assert model.context_cost("target").per_kv_ms == pytest.approx(KV_MS, rel=1e-9)
    assert model.predict("target", 2, 3.0, 256) == pytest.approx(_truth("target", 2, 3.0, 256), rel=1e-9)


KV_TOKEN_MS = 0.0008  # ms more per KV token a verify reads, per sequence, for each further token it carries


def _width_samples(rng: random.Random, noise: float = 0.0) -> list[CostSample]:
    """A verify whose attention's arithmetic grows with the tokens it carries (a CPU's): its KV term is
    batch x context x (KV_MS + KV_TOKEN_MS x (tokens - 1)); the draft and the overhead as in `_samples`."""
    samples = [s for s in _samples(rng, noise) if s.role != "target"]
    for batch, depth, context in itertools.product([1, 2, 4, 8, 16], range(0, 9), [256, 1024, 4096, 16384]):
        tokens = 1.0 + depth
        kv = batch * context * (KV_MS + KV_TOKEN_MS * depth)
        for _ in range(MIN_CELL_SAMPLES):
            ms = (LONG_CONTEXT["target"](batch, tokens) + kv) * (1 + rng.uniform(-noise, noise))
            samples.append(CostSample("target", batch, tokens, ms, float(context)))
    return samples


def test_fit_recovers_a_kv_term_that_grows_with_the_tokens_a_verify_carries() -> None:
    model = CostModel.fit(_width_samples(random.Random(6)), LONG_CONTEXT)
    target = model.context_cost("target")
    assert target.per_kv_ms == pytest.approx(KV_MS, rel=1e-6)
    assert target.per_kv_token_ms == pytest.approx(KV_TOKEN_MS, rel=1e-6)
    for batch, depth, context in [(1, 0, 16384), (8, 2, 4096), (16, 8, 16384), (4, 5, 50_000)]:
        truth = LONG_CONTEXT["target"](batch, 1.0 + depth) + batch * context * (KV_MS + KV_TOKEN_MS * depth)
        assert model.predict("target", batch, 1.0 + depth, context) == pytest.approx(truth, rel=1e-6)
    # The draft's levels are passes of one token each: no width term, and its slope stays about 0.
    assert model.context_cost("draft").per_kv_token_ms == 0.0
    # Through noise, about the same; where every verify carries the same tokens per sequence, no width term.
    noisy = CostModel.fit(_width_samples(random.Random(7), noise=0.05), LONG_CONTEXT).context_cost("target")
    assert noisy.per_kv_token_ms == pytest.approx(KV_TOKEN_MS, rel=0.15)
    assert noisy.per_kv_ms == pytest.approx(KV_MS, rel=0.15)
    assert CostModel.fit(_samples(random.Random(8)), LONG_CONTEXT).context_cost("target").per_kv_token_ms == 0.0


def test_a_verify_priced_by_its_width_drafts_less_at_long_context() -> None:
    """Where each token a verify carries reads the long KV again (a CPU), drafting deep at long context costs
    what the width-blind model misses: the fitted model chooses shallower depths there, as the brute force over the
    true costs does."""
    fitted = CostModel.fit(_width_samples(random.Random(9)), LONG_CONTEXT)
    blind = CostModel(LONG_CONTEXT, context_costs={"target": ContextCost(KV_MS, reference=256.0)})
    for batch, context in itertools.product([1, 4, 16], [4096, 16384]):
        alphas, contexts = [0.8] * batch, [context] * batch
        aware = choose_depths(alphas, fitted, 8, contexts=contexts).depths[0]
        best = max(range(9), key=lambda d: plan_goodput(alphas, [d] * batch, fitted, contexts=contexts))
        assert aware == best and aware < choose_depths(alphas, blind, 8, contexts=contexts).depths[0]


def test_the_default_slope_never_prices_a_measured_cell_above_what_it_took() -> None:
    """Warm-up requests at 64 tokens, then 8 sequences at 7K only: no cell spans two contexts, and the default's
    slope alone would claim more than the whole step. Scaled down to what the cells measured above the floor the
    table keeps (the batch-1 step at the reference), the steps are priced at their measurements at the context they
    were measured at, and past it by the scaled slope."""
    samples = [CostSample("target", 1, 1.0, 63.0, 64.0)] * MIN_CELL_SAMPLES
    samples += [CostSample("target", 8, 1.0, 170.0, 7168.0)] * 10 + [CostSample("target", 8, 2.0, 230.0, 7168.0)] * 10
    default_kv = DEFAULT_COSTS["target"].per_kv_ms  # type: ignore[attr-defined]
    assert default_kv * 8 * (7168 - 64) > 170.0
    model = CostModel.fit(samples)
    target = model.context_cost("target")
    assert not target.fitted and target.per_kv_ms == pytest.approx((170.0 - 63.0) / (8 * (7168 - 64)))
    assert model.predict("target", 8, 1.0, 7168) == pytest.approx(170.0)
    assert model.predict("target", 8, 2.0, 7168) == pytest.approx(230.0)
    assert model.predict("target", 8, 1.0, 8192) == pytest.approx(170.0 + target.per_kv_ms * 8 * 1024)
    assert model.predict("target", 1, 1.0, 64) == pytest.approx(63.0)
    # Where the cells allow the default's slope, it stands.
    allowed = [CostSample("target", 8, 1.0, 170.0 + default_kv * 8 * (7168 - 64), 7168.0)] * MIN_CELL_SAMPLES
    assert CostModel.fit(samples[:MIN_CELL_SAMPLES] + allowed).context_cost("target").per_kv_ms == default_kv


@pytest.mark.parametrize("seed", [0, 1])
def test_predictions_are_monotone_in_batch_tokens_and_context(seed: int) -> None:
    rng = random.Random(seed)
    samples = [CostSample(role, rng.randint(1, 6), rng.choice([1, 2, 3, 5, 8]), rng.uniform(1, 80),
                          rng.choice([None, 100.0, 700.0, 3000.0, 9000.0]))
               for role in ("target", "draft", "overhead") for _ in range(300)]
    for model in (CostModel.fit(samples), CostModel(LONG_CONTEXT)):
        for role in ("target", "draft", "overhead"):
            batches, tokens, contexts = [1, 2, 3, 5, 8, 40], [1, 1.5, 2, 4, 7, 20], [0, 90, 500, 3000, 20000]
            grid = {(b, t, c): model.predict(role, b, t, c) for b in batches for t in tokens for c in contexts}
            for (b, t, c), ms in grid.items():
                assert ms >= 0
                for later, key in ((batches, (None, t, c)), (tokens, (b, None, c)), (contexts, (b, t, None))):
                    axis = key.index(None)
                    value = (b, t, c)[axis]
                    if value != later[-1]:
                        bigger = later[later.index(value) + 1]
                        grown = tuple(bigger if i == axis else v for i, v in enumerate((b, t, c)))
                        assert grid[grown] >= ms - 1e-9, (role, (b, t, c), grown)


def test_context_buckets_round_up_by_at_most_an_eighth_and_stay_few() -> None:
    buckets = {context_bucket(c) for c in range(0, 200_000)}
    assert len(buckets) < 130  # about eight a doubling: the step-cost memo stays small
    for c in [0, 1, 15, 16, 17, 255, 256, 257, 1000, 4095, 4097, 123_456]:
        assert c <= context_bucket(c) <= max(c, math.ceil(c * 1.125))
    assert context_bucket(100.4) == context_bucket(101)
    model = CostModel(LONG_CONTEXT)
    for c in range(1000, 1100):
        model.step_costs(4, 8, c)
    assert len({model.step_costs(4, 8, c).context for c in range(1000, 1100)}) <= 3


# --- the depth the policy chooses --------------------------------------------------------------------------


def test_depth_rises_with_context() -> None:
    costs = CostModel(LONG_CONTEXT)
    for batch in [1, 4, 16]:
        depths = [choose_depths([0.8] * batch, costs, 12, contexts=[c] * batch).depths[0] for c in CONTEXTS]
        assert depths == sorted(depths) and depths[-1] > depths[0], (batch, depths)
    # Unequal contexts price at their mean.
    assert choose_depths([0.8] * 2, costs, 12, contexts=[0, 16384]).depths == choose_depths(
        [0.8] * 2, costs, 12, contexts=[8192, 8192]).depths


def test_at_long_context_depth_rises_with_batch() -> None:
    costs = CostModel(LONG_CONTEXT)
    for context in [8192, 16384, 32768]:
        depths = [choose_depths([0.8] * b, costs, 12, contexts=[context] * b).depths[0] for b in BATCHES]
        assert depths == sorted(depths), (context, depths)
    depths = [choose_depths([0.8] * b, costs, 12, contexts=[16384] * b).depths[0] for b in BATCHES]
    assert depths[-1] > depths[0]


def test_a_fitted_model_chooses_like_the_costs_it_was_fitted_from() -> None:
    fitted = CostModel.fit(_samples(random.Random(5)), LONG_CONTEXT)
    truth = CostModel(LONG_CONTEXT, context_costs={"target": ContextCost(KV_MS, reference=0.0)})  # `_truth`
    for batch, context in itertools.product([1, 2, 4, 8, 16], [256, 1024, 4096, 16384]):
        alphas, contexts = [0.8] * batch, [context] * batch
        assert choose_depths(alphas, fitted, 12, contexts=contexts).depths == choose_depths(
            alphas, truth, 12, contexts=contexts).depths, (batch, context)
    depths = [choose_depths([0.8] * 4, fitted, 12, contexts=[c] * 4).depths[0] for c in [256, 1024, 4096, 16384]]
    assert depths == sorted(depths) and depths[-1] > depths[0]


def test_tree_budget_rises_with_context() -> None:
    costs = CostModel(LONG_CONTEXT)
    candidates = [[TreePlan(0, ())] * 4, *([TreePlan(d, (1,) * d)] * 4 for d in range(1, 9)),
                  *([TreePlan(2 * d, (2,) * d)] * 4 for d in range(1, 9))]
    budgets = [choose_tree_plan([0.7] * 4, costs, candidates, contexts=[c] * 4) for c in CONTEXTS]
    nodes = [d.budgets[d.index] for d in budgets]
    assert nodes == sorted(nodes) and nodes[-1] > nodes[0], nodes
    assert budgets[-1].reason.endswith(f"; context {context_bucket(CONTEXTS[-1])} tokens")


def _random_context_costs(rng: random.Random) -> CostModel:
    """Analytic costs with random coefficients and KV slopes, or a model fitted from random samples at random
    contexts."""
    if rng.random() < 0.5:
        return CostModel({
            "target": AnalyticCost(fixed_ms=rng.uniform(1, 30), per_seq_ms=rng.uniform(0, 5),
                                   per_token_ms=rng.uniform(0, 3), knee_tokens=rng.uniform(1, 12),
                                   past_knee_ms=rng.uniform(0, 10), per_kv_ms=rng.uniform(0, 0.01)),
            "draft": AnalyticCost(fixed_ms=rng.uniform(0, 5), per_token_ms=rng.uniform(0, 4),
                                  per_kv_ms=rng.choice([0.0, rng.uniform(0, 0.002)])),
            "overhead": AnalyticCost(fixed_ms=rng.uniform(0, 5), per_seq_ms=rng.uniform(0, 1)),
        })
    samples = [CostSample(role, rng.randint(1, 3), rng.choice([1, 1.5, 2, 3, 4, 5]), rng.uniform(0.5, 60),
                          rng.choice([None, 64.0, 512.0, 4096.0]))
               for role in ("target", "draft", "overhead") for _ in range(rng.randint(1, 40))]
    return CostModel.fit(samples)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_depths_with_contexts_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        batch, max_depth = rng.randint(1, 3), rng.randint(0, 4)
        alphas = [rng.choice([0.0, 0.95, rng.random(), rng.random()]) for _ in range(batch)]
        contexts = [rng.choice([0, 100, 2000, 30000, rng.randint(0, 60000)]) for _ in range(batch)]
        costs = _random_context_costs(rng)
        plans = list(itertools.product(range(max_depth + 1), repeat=batch))
        throughput = choose_depths(alphas, costs, max_depth, contexts=contexts)
        best = max(plan_goodput(alphas, p, costs, contexts=contexts) for p in plans)
        assert throughput.goodput == pytest.approx(plan_goodput(alphas, throughput.depths, costs, contexts=contexts),
                                                   rel=REL)
        assert throughput.step_ms == pytest.approx(plan_step_ms(costs, throughput.depths, contexts=contexts), rel=REL)
        assert throughput.goodput >= best * (1 - REL), (alphas, contexts, max_depth, throughput)
        latency = choose_depths_for_latency(alphas, costs, max_depth, contexts=contexts)
        fastest = min(plan_time_per_token(alphas, p, costs, contexts=contexts) for p in plans)
        assert latency.time_per_token_ms <= fastest * (1 + REL), (alphas, contexts, max_depth, latency)


@pytest.mark.parametrize("seed", [0, 1])
def test_tree_budget_with_contexts_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(30):
        batch = rng.randint(1, 3)
        alphas = [rng.random() for _ in range(batch)]
        contexts = [rng.choice([0, 500, 8000, 40000]) for _ in range(batch)]
        costs = _random_context_costs(rng)
        candidates = [[TreePlan(0, ())] * batch, *([TreePlan(d, (1,) * d)] * batch for d in range(1, 5))]
        decision = choose_tree_plan(alphas, costs, candidates, contexts=contexts)
        # Chains are depth plans: the same pricing must rank them as the depth search's brute force does.
        chain_goodputs = [plan_goodput(alphas, [d] * batch, costs, contexts=contexts) for d in range(5)]
        assert decision.goodputs == pytest.approx(chain_goodputs, rel=REL)
        assert decision.goodput == pytest.approx(max(chain_goodputs), rel=REL)


def test_without_contexts_the_search_prices_at_the_reference_as_before() -> None:
    costs = CostModel(LONG_CONTEXT)
    alphas = [0.3, 0.8, 0.95]
    assert choose_depths(alphas, costs, 8).depths == choose_depths(alphas, costs, 8, contexts=[0, 0, 0]).depths
    assert "context" not in choose_depths(alphas, costs, 8).reason
    with pytest.raises(ValueError, match="one entry per sequence"):
        choose_depths(alphas, costs, 8, contexts=[100, 100])
    with pytest.raises(ValueError, match="contexts must be finite"):
        choose_depths(alphas, costs, 8, contexts=[100, -1, 100])


# --- where the contexts come from --------------------------------------------------------------------------


def test_the_planner_prices_each_step_at_its_sequences_lengths() -> None:
    policy = DepthPolicy(max_depth=8, defaults=LONG_CONTEXT)

    class AnyRoom:
        def room(self, seq: object) -> None:
            return None

    planner = Planner(RouterConfig(max_depth=8), PolicyFeed(policy, None, 1.0, "throughput"), AnyRoom(),  # type: ignore[arg-type]
                      "target:1", max_context=100_000)
    short = [live_request(f"s{i}", [1] * 300, 64) for i in range(4)]
    long = [live_request(f"l{i}", [1] * 30_000 + [2] * i, 64) for i in range(4)]
    short_plan, long_plan = planner.plan(short), planner.plan(long)
    assert short_plan.reason.endswith(f"; context {context_bucket(300)} tokens")
    assert long_plan.reason.endswith(f"; context {context_bucket(30_001.5)} tokens")
    assert long_plan.deepest > short_plan.deepest
    tree = policy.choose_tree([(0, 0)] * 2, [[TreePlan(0, ())] * 2, [TreePlan(3, (1, 1, 1))] * 2],
                              contexts=[1000, 3000])
    assert tree.reason.endswith(f"; context {context_bucket(2000)} tokens")


def test_latency_fields_carry_the_context_and_read_without_it() -> None:
    fields = _latency_fields(LatencySample("target", "t0", 4, 3.0, 41.5, 2048.25))
    as_read = {k.encode(): str(v).encode() for k, v in fields.items()}
    assert _cost_sample_from_fields(as_read) == CostSample("target", 4, 3.0, 41.5, 2048.25)
    old = _latency_fields(LatencySample("target", "t0", 4, 3.0, 41.5))
    assert "context" not in old  # written as older writers wrote it
    assert _cost_sample_from_fields({k.encode(): str(v).encode() for k, v in old.items()}).context is None
