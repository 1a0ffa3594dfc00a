"""Several draft pools: each sequence's drafter and depth, chosen from each drafter's costs and each sequence's own
acceptance with it, against brute force; and the policy's per-kind cost fits."""

from __future__ import annotations

import itertools
import random

import pytest

from specfleet.policy import DRAFT_HURDLE, DepthPolicy
from specfleet.policy.costs import DEFAULT_COSTS, AnalyticCost, CostModel, CostSample, SelfDrafting
from specfleet.policy.depth_policy import PoolCounts
from specfleet.policy.drafter_choice import PoolOption, choose_pools, mixed_goodput, mixed_step_ms

TARGET = AnalyticCost(fixed_ms=16.7, per_seq_ms=6.7, per_token_ms=1.6, per_kv_ms=0.02)
OVERHEAD = AnalyticCost(fixed_ms=3.0)
NGRAM = CostModel({"target": TARGET, "draft": AnalyticCost(fixed_ms=0.8, per_token_ms=0.025), "overhead": OVERHEAD})
# A draft whose cost does not grow with the context (no per_kv_ms), a model pass per level.
SPARSE = CostModel({"target": TARGET, "draft": AnalyticCost(fixed_ms=2.0, per_token_ms=8.0), "overhead": OVERHEAD})


def _options(ngram_alphas: list[float], sparse_alphas: list[float], limit: int = 4,
             ngram_offers: list[float] | None = None) -> list[PoolOption]:
    batch = len(ngram_alphas)
    return [PoolOption("ngram", NGRAM, ngram_alphas, ngram_offers or [1.0] * batch, [limit] * batch),
            PoolOption("sparse_self", SPARSE, sparse_alphas, [1.0] * batch, [limit] * batch)]


def _brute_force(options: list[PoolOption], max_depth: int, contexts: list[int]) -> float:
    batch = len(options[0].alphas)
    choices = [(p, d) for p in range(len(options)) for d in range(max_depth + 1)]
    return max(mixed_goodput(options, [c[0] for c in combo], [c[1] for c in combo], contexts)
               for combo in itertools.product(choices, repeat=batch))


@pytest.mark.parametrize("seed", range(12))
def test_the_choice_is_within_a_percent_of_the_brute_force_optimum(seed: int) -> None:
    """Near-optimal, not exact: coordinate ascent can stop where only two sequences moving together would gain
    (a few tenths of a percent on these random batches)."""
    rng = random.Random(seed)
    batch = rng.randint(1, 3)
    contexts = [rng.choice([200, 2000, 7000]) for _ in range(batch)]
    options = _options([rng.random() * 0.95 for _ in range(batch)], [0.4 + rng.random() * 0.5 for _ in range(batch)],
                       ngram_offers=[rng.choice([1.0, 0.6]) for _ in range(batch)])
    decision = choose_pools(options, 4, contexts=contexts)
    assert decision.goodput >= 0.99 * _brute_force(options, 4, contexts)
    pools = [[o.name for o in options].index(name) for name in decision.pools]
    assert decision.goodput == pytest.approx(mixed_goodput(options, pools, list(decision.depths), contexts))


def test_a_code_edit_keeps_the_ngram_drafter_while_a_long_document_drafts_sparse() -> None:
    """The n-gram drafter is right on a repetitive edit and wrong on prose; the sparse draft is decent on both and
    costs a model pass per level: the edit stays on the free drafter, the document takes the sparse one."""
    options = _options(ngram_alphas=[0.9, 0.05], sparse_alphas=[0.7, 0.75])
    decision = choose_pools(options, 4, contexts=[300, 6000])
    assert decision.pools[0] == "ngram" and decision.depths[0] >= 3
    assert decision.pools[1] == "sparse_self" and decision.depths[1] >= 1
    single = dict(decision.single_pool_goodput)
    assert decision.goodput > max(single["ngram"], single["sparse_self"], single["none"])
    assert decision.reason.startswith("drafters ngram x1 ") and "sparse_self x1" in decision.reason
    assert decision.reason.endswith("; context 3328 tokens")


def test_a_pool_a_sequence_cannot_draft_from_is_not_chosen_for_it() -> None:
    options = _options([0.2, 0.2], [0.9, 0.9])
    options[1] = PoolOption("sparse_self", SPARSE, [0.9, 0.9], [1.0, 1.0], [4, 0])  # no replica for the second
    decision = choose_pools(options, 4, contexts=[4000, 4000])
    assert decision.pools[0] == "sparse_self" and decision.depths[0] > 0
    assert decision.pools[1] == "ngram" or decision.depths[1] == 0


def test_drafting_pools_run_in_parallel_so_the_slowest_prices_the_step() -> None:
    options = _options([0.5, 0.5], [0.5, 0.5])
    shared = NGRAM.step_costs(2, 2)
    # One sequence on each pool: the sparse pool's Propose of one sequence, not the sum of both pools' calls.
    expected = SPARSE.predict("draft", 1, 2.0) + shared.target_at(4.0) + shared.overhead_ms[2]
    assert mixed_step_ms(options, [0, 1], [2, 2]) == pytest.approx(expected)
    assert SPARSE.predict("draft", 1, 2.0) > NGRAM.predict("draft", 1, 2.0)


def test_a_small_gain_gives_way_to_plain_decoding() -> None:
    options = _options([0.05, 0.05], [0.1, 0.1])
    decision = choose_pools(options, 4, contexts=[300, 300], min_gain=0.1)
    assert decision.depths == (0, 0) and "plain x2" in decision.reason


def test_pinned_depth_only_chooses_the_pool() -> None:
    options = _options([0.9, 0.1], [0.5, 0.6], limit=3)
    decision = choose_pools(options, 3, contexts=[300, 300], pinned=True)
    assert decision.depths == (3, 3) and decision.pools == ("ngram", "sparse_self")
    assert decision.reason.startswith("pinned drafters ")


def test_each_drafter_kind_is_priced_from_its_own_samples() -> None:
    """Draft samples say their drafter: a pool of n-gram drafters and one of sparse drafters get their own draft
    costs, sharing the target's; the sparse draft's cost measured flat against context fits no slope."""
    policy = DepthPolicy(max_depth=4)
    samples = [CostSample("target", 1, 2.0, 30.0 + 0.02 * ctx, ctx) for ctx in (256, 2048, 4096) for _ in range(3)]
    samples += [CostSample("draft", 1, 2.0, 1.0, ctx, "ngram") for ctx in (256, 2048, 4096) for _ in range(3)]
    samples += [CostSample("draft", 1, 2.0, 40.0, ctx, "sparse_self") for ctx in (256, 2048, 4096) for _ in range(3)]
    policy.update(samples, 10, 10)
    ngram, sparse = policy.costs_for("ngram"), policy.costs_for("sparse_self")
    assert ngram.predict("draft", 1, 2.0, 4096) == pytest.approx(1.0)
    assert sparse.predict("draft", 1, 2.0, 256) == pytest.approx(sparse.predict("draft", 1, 2.0, 4096)) == \
        pytest.approx(40.0)
    assert ngram.predict("target", 1, 2.0, 4096) == pytest.approx(sparse.predict("target", 1, 2.0, 4096))
    assert policy.costs_for("ngram") is ngram  # fitted once per refit


def test_an_unmeasured_sparse_drafter_costs_a_pass_per_level() -> None:
    policy = DepthPolicy(max_depth=4)
    sparse, ngram = policy.costs_for("sparse_self"), policy.costs_for("ngram")
    assert sparse.predict("draft", 2, 3.0) == pytest.approx(3 * sparse.predict("draft", 2, 1.0))
    assert sparse.predict("draft", 2, 3.0) > 10 * ngram.predict("draft", 2, 3.0)


def test_the_policy_chooses_pools_from_each_sequences_counts_with_each() -> None:
    """On a device where a verify's KV reads dominate at long context (4x this CPU's slope), a long sequence that
    the n-gram drafter misses drafts with the sparse pool, and at short context it does not."""
    policy = DepthPolicy(max_depth=4, defaults={**DEFAULT_COSTS, "target": TARGET})
    pools = [PoolCounts("a", "ngram", [(90, 5), (1, 40)], [(95, 0), (41, 0)], [4, 4]),
             PoolCounts("b", "sparse_self", [(0, 0), (60, 10)], [(0, 0), (70, 0)], [4, 4])]
    # Long contexts: a verify reads a long KV cache, and the sparse draft's passes do not, so drafting pays.
    decision = policy.choose_pools(pools, contexts=[6000, 6000])
    assert decision.pools == ("a", "b") and min(decision.depths) > 0
    # Short ones: the sparse draft's passes cost about what the verify does, and the second sequence plain-decodes.
    short = policy.choose_pools(pools, contexts=[300, 300])
    assert short.pools[0] == "a" and short.depths[1] <= 1


def test_a_single_pool_is_priced_by_its_own_drafter_kind() -> None:
    """One Redis, two fleets: cheap n-gram samples must not make a sparse_self router draft as if its drafts were
    free, nor its expensive ones hold an n-gram router back."""
    policy = DepthPolicy(max_depth=4)
    samples = [CostSample("target", 8, t, 200.0 + 20.0 * t, 4096) for t in (1.0, 2.0, 3.0) for _ in range(3)]
    samples += [CostSample("draft", 8, 1.0, 1.0, 4096, "ngram") for _ in range(6)]
    samples += [CostSample("draft", 8, 1.0, 900.0, 4096, "sparse_self") for _ in range(3)]
    policy.update(samples, 50, 50)
    counts, limits = [(5, 5)] * 8, [4] * 8
    assert policy.choose(counts, limits, contexts=[4096] * 8, drafter="ngram").depths[0] > 0
    assert policy.choose(counts, limits, contexts=[4096] * 8, drafter="sparse_self").depths == (0,) * 8


def test_a_fresh_sequence_starts_from_its_drafter_kinds_acceptance() -> None:
    """One Redis, two kinds of drafter: the n-gram pools' drafts are accepted half as often as the model pools'. A
    sequence with no counts of its own starts from its kind's rate (shrunk toward the fleet's), not the fleet's mix,
    so it drafts as deep as its kind earns; a kind with no counts yet starts from the fleet's."""
    policy = DepthPolicy(max_depth=6)
    policy.update([], 1200, 1800, drafter_first_tries={"ngram": (200, 1600), "model": (1000, 200)})
    ngram, model, fleet = (policy.fleet_alpha_for(k) for k in ("ngram", "model", None))
    assert ngram < fleet < model
    assert ngram == pytest.approx(200 / 1800, abs=0.02) and model == pytest.approx(1000 / 1200, abs=0.02)
    assert policy.fleet_alpha_for("sparse_self") == fleet
    fresh, limits = [(0, 0)] * 4, [6] * 4
    assert policy.choose(fresh, limits, drafter="ngram").depths < policy.choose(fresh, limits,
                                                                                drafter="model").depths
    pools = [PoolCounts("n", "ngram", fresh, [(0, 0)] * 4, limits), PoolCounts("m", "model", fresh, [(0, 0)] * 4,
                                                                                   limits)]
    # Priced alike (the defaults' draft costs), the kind accepted more wins every fresh sequence.
    assert policy.choose_pools(pools).pools == ("m",) * 4


def test_a_fresh_sequence_starts_from_its_drafter_kinds_offer_rate() -> None:
    """One Redis, two kinds of drafter: prompt lookup offers drafts in a sixth of the steps it is asked (it has
    nothing where the context has no match), the sparse_self draft in every one. A fresh sparse_self sequence is
    priced as offering every step, not at the fleet's mix, which would price its drafts at under half of what they
    emit and decode plainly where drafting gains a fifth; a kind with no counts yet starts from the fleet's."""
    samples = [CostSample("target", 8, t, 300.0 + 80.0 * (t - 1), 7200.0) for t in (1.0, 2.0, 3.0) for _ in range(3)]
    samples += [CostSample("draft", 8, d, 85.0 * d, 7200.0, "sparse_self") for d in (1.0, 2.0) for _ in range(3)]
    tries = {"ngram": (100, 150), "sparse_self": (600, 150)}
    by_kind, fleet_only = (DepthPolicy(max_depth=4, min_gain=DRAFT_HURDLE) for _ in range(2))
    by_kind.update(samples, 700, 300, 400, 500, drafter_first_tries=tries,
                   drafter_offers={"ngram": (100, 500), "sparse_self": (300, 0)})
    fleet_only.update(samples, 700, 300, 400, 500, drafter_first_tries=tries)
    assert by_kind.fleet_offer_rate_for("sparse_self") == pytest.approx(1.0, abs=0.03)
    assert by_kind.fleet_offer_rate_for("ngram") == pytest.approx(100 / 600, abs=0.03)
    assert by_kind.fleet_offer_rate_for("model") == by_kind.fleet_offer_rate == pytest.approx(400 / 900, abs=0.03)
    fresh, limits, contexts = [(0, 0)] * 8, [4] * 8, [7200] * 8
    assert by_kind.choose(fresh, limits, fresh, contexts=contexts, drafter="sparse_self").depths == (2,) * 8
    assert fleet_only.choose(fresh, limits, fresh, contexts=contexts, drafter="sparse_self").depths == (0,) * 8
    pools = [PoolCounts("s", "sparse_self", fresh, fresh, limits)]
    assert by_kind.choose_pools(pools, contexts=contexts).depths == (2,) * 8
    assert fleet_only.choose_pools(pools, contexts=contexts).depths == (0,) * 8


def test_a_self_drafting_target_prices_its_drafts_as_tokens_of_its_verify() -> None:
    """SPACE: no draft call, and d drafts per sequence make the verify feed the d candidates and d + 1 groups of d
    masks; so at the same acceptance it drafts less deep than a chain from a free drafter, and draft samples of
    other fleets in the same Redis do not price it. Lookahead: its Jacobi chain rides along whatever it drafts."""
    policy = DepthPolicy(max_depth=6, defaults={**DEFAULT_COSTS, "target": TARGET})
    policy.update([CostSample("draft", 2, 2.0, 500.0, 256, None) for _ in range(6)], 50, 50)
    space, lookahead = policy.self_drafted_costs(SelfDrafting("space")), policy.self_drafted_costs(
        SelfDrafting("lookahead", width=6))
    for costs, fed in ((space, lambda d: d + (d + 1) * d), (lookahead, lambda d: d + 6)):
        steps = costs.step_costs(batch_size=2, max_depth=6)
        assert steps.draft_ms == (0.0,) * 7
        for d in range(7):
            assert steps.target_ms[2 * d] == pytest.approx(costs.predict("target", 2, 1 + fed(d)))
    counts, limits = [(80, 20)] * 2, [6] * 2
    self_drafted = policy.choose(counts, limits, drafter=SelfDrafting("space"))
    free_chains = DepthPolicy(max_depth=6, defaults={**DEFAULT_COSTS, "target": TARGET,
                                                     "draft": AnalyticCost(fixed_ms=0.0)})
    chain = free_chains.choose(counts, limits, drafter="ngram")
    assert 0 < max(self_drafted.depths) < max(chain.depths), (self_drafted.reason, chain.reason)
    assert policy.self_drafted_costs(SelfDrafting("space")) is space  # fitted once per refit
