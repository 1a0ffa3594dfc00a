"""A drafter's catch-up priced: what computing a sequence's prompt costs its drafter (measured by the draft service),
against what drafting would save over the rest of the request; the planner lets sequences start drafting only where
it pays, and with prompts computed alongside the target on its cores, sends those prompts only where it pays."""

from __future__ import annotations

import asyncio

import pytest
from step_fakes import VOCAB, FakeDrafter, RecordedTelemetry, live_request

from draft_service.server import DraftServicer
from router.draft_pool import DraftPool
from router.grpc_link import delta_to_proto
from router.live_request import DRAFT_POOL, DraftSession, LiveRequest
from router.planner import Planner
from router.policy_feed import PolicyFeed
from router.replicas import DraftReplica, ReplicaInfo
from router.strategies import Strategies
from specfleet.config import DraftConfig, RouterConfig
from specfleet.drafters import NgramDrafter
from specfleet.otel import RouterMetrics
from specfleet.policy import PREFILL_ROLE, CostModel, CostSample, DepthPolicy, price_catch_up
from specfleet.policy.catch_up import drafting_saving_ms, fit_prefill_rates
from specfleet.protos import draft_pb2
from specfleet.speculation import StepPlan
from specfleet.stats import AcceptanceCounts
from specfleet.telemetry import LatencySample, _cost_sample_from_fields, _latency_fields


def test_a_catch_up_pays_when_drafting_saves_more_over_the_tokens_left_than_it_costs() -> None:
    # Plain decoding at 10 tokens/s, drafting at 20: each token left saves 50 ms. 300 prompt tokens at 1 ms each.
    assert drafting_saving_ms(100, 10.0, 20.0) == pytest.approx(5000.0)
    cheap = price_catch_up([150, 150], [50, 50], 1.0, 10.0, 20.0)
    assert (cheap.sequences, cheap.tokens, cheap.remaining) == (2, 300, 100)
    assert cheap.cost_ms == pytest.approx(300.0) and cheap.pays
    assert "it pays" in cheap.describe()
    # Twenty times dearer a prompt token: 6000 ms against 5000 saved.
    dear = price_catch_up([150, 150], [50, 50], 20.0, 10.0, 20.0)
    assert not dear.pays
    assert dear.describe() == ("the draft's catch-up on 2 sequences (300 tokens, about 6000 ms) against what drafting "
                               "saves over their 100 tokens left (about 5000 ms): they decode plainly")
    # Drafting no faster than plain decoding saves nothing: no catch-up pays.
    assert drafting_saving_ms(100, 10.0, 9.0) == 0.0 and not price_catch_up([150], [50], 0.01, 10.0, 9.0).pays
    with pytest.raises(ValueError, match="one entry per sequence"):
        price_catch_up([150], [50, 50], 1.0, 10.0, 20.0)


def test_prefill_rates_are_each_drafter_kinds_median_ms_per_prompt_token_and_leave_the_step_costs_alone() -> None:
    prefills = [CostSample(PREFILL_ROLE, 4, 150.0, ms, drafter="llamacpp") for ms in (600.0, 1200.0, 9000.0)]
    unsaid = CostSample(PREFILL_ROLE, 1, 100.0, 300.0)
    assert fit_prefill_rates([*prefills, unsaid]) == {"llamacpp": pytest.approx(2.0), "": pytest.approx(3.0)}

    steps = [CostSample("target", 1, 1.0 + d, 50.0 + 2 * d) for d in range(4) for _ in range(3)]
    with_prefills, without = CostModel.fit([*steps, *prefills]), CostModel.fit(steps)
    assert with_prefills.fitted_roles == without.fitted_roles == {"target": 12}
    assert with_prefills.predict("target", 1, 3.0) == without.predict("target", 1, 3.0)

    policy = DepthPolicy(max_depth=4)
    assert policy.prefill_ms_per_token("llamacpp") is None
    policy.update([*steps, *prefills, unsaid], 0, 0)
    assert policy.prefill_ms_per_token("llamacpp") == pytest.approx(2.0)
    assert policy.prefill_ms_per_token("model") == pytest.approx(3.0)  # no samples of its own: the unsaid kind's


def test_a_prefill_sample_travels_through_redis_fields() -> None:
    sample = LatencySample(PREFILL_ROLE, "draft-1", 4, 150.0, 612.0, drafter="llamacpp")
    read = _cost_sample_from_fields({k.encode(): str(v).encode() for k, v in _latency_fields(sample).items()})
    assert read == CostSample(PREFILL_ROLE, 4, 150.0, 612.0, drafter="llamacpp")


class _Context:
    def invocation_metadata(self) -> tuple[()]:
        return ()


def test_the_draft_service_reports_what_computing_prompts_cost_it() -> None:
    telemetry = RecordedTelemetry("draft")
    servicer = DraftServicer(DraftConfig(drafter="ngram"), NgramDrafter(), telemetry=telemetry)  # type: ignore[arg-type]

    def propose(*entries: tuple[str, int, list[int], int]) -> None:
        request = draft_pb2.ProposeRequest(entries=[
            draft_pb2.ProposeEntry(sequence=delta_to_proto(seq_id, rollback_to, tokens), depth=depth)
            for seq_id, rollback_to, tokens, depth in entries])
        asyncio.run(servicer.Propose(request, _Context()))  # type: ignore[arg-type]

    propose(("a", 0, list(range(40)), 2), ("b", 0, list(range(60)), 0), ("c", 0, [1, 2], 2))
    prompts = [s for s in telemetry.samples if s.role == PREFILL_ROLE]
    assert [(s.batch_size, s.tokens_per_seq, s.drafter) for s in prompts] == [(2, 50.0, "ngram")]
    assert not [s for s in telemetry.samples if s.role == "draft"]  # a call that computed prompts is no step's cost
    propose(("a", 42, [7], 2), ("c", 4, [3], 2))
    assert [s.role for s in telemetry.samples] == [PREFILL_ROLE, "draft"]


# --- the planner ---------------------------------------------------------------------------------------------

PROMPT, NEW_TOKENS = 150, 64


def _planner(rate_ms: float | None, *, alongside: bool = False, target_cpus: tuple[int, ...] | None = None,
             draft_cpus: tuple[int, ...] = (0, 1)) -> tuple[Planner, DraftReplica]:
    """A router with one draft pool whose drafter keeps a KV cache, computing prompts at ``rate_ms`` a token (None:
    not measured), and a target on a 1-token verify of 100 ms at batch 1 that 4 more tokens add 10 ms to."""
    config = RouterConfig(depth="auto", max_depth=4, prefill_alongside=alongside)
    policy = DepthPolicy(max_depth=4, min_gain=0.1)
    samples = [CostSample("target", b, 1.0 + d, 100.0 * b + 2.5 * d) for b in (1, 2) for d in range(5)
               for _ in range(3)]
    samples += [CostSample("draft", b, float(d), 5.0 * d, drafter="llamacpp") for b in (1, 2) for d in range(1, 6)
                for _ in range(3)]
    if rate_ms is not None:
        samples += [CostSample(PREFILL_ROLE, 2, 150.0, 300.0 * rate_ms, drafter="llamacpp")] * 3
    policy.update(samples, 900, 100)  # the drafter is accepted 90% of the time
    strategies = Strategies({DRAFT_POOL: DraftPool(2000.0, 60.0, RouterMetrics(), prefill_alongside=alongside)})
    target_info = None if target_cpus is None else ReplicaInfo("toy", "target", VOCAB, "toy", 512, 8, host="node-a",
                                                                cpus=target_cpus)
    planner = Planner(config, PolicyFeed(policy, None, 1.0, "throughput"), strategies, "target:1", 512,
                      target_info=target_info)
    replica = DraftReplica("draft:1", FakeDrafter(), ReplicaInfo("toy", "llamacpp", VOCAB, "toy", 512, 8,
                                                                 host="node-a", cpus=draft_cpus))
    return planner, replica


def _starting(replica: DraftReplica, n: int = 2) -> list[LiveRequest]:
    batch = [live_request(f"s{i}", list(range(PROMPT)), NEW_TOKENS, draft=replica) for i in range(n)]
    for seq in batch:
        seq.stats.acceptance = AcceptanceCounts(sequence_steps=100, accepted=300, rejections=30)
    return batch


def test_starting_sequences_draft_where_their_drafters_catch_up_pays_and_decode_plainly_where_it_does_not() -> None:
    # Drafting about doubles the batch's goodput: over 128 tokens left that saves seconds, against 300 prompt tokens.
    cheap, replica = _planner(1.0)
    batch = _starting(replica)
    plan = cheap.plan(batch)
    assert all(plan.draft(s.seq_id).levels > 0 for s in batch) and not plan.no_catch_up
    assert "catch-up on 2 sequences (300 tokens, about 300 ms)" in plan.reason and "it pays" in plan.reason

    dear, replica = _planner(100.0)  # 30 s of catching up
    batch = _starting(replica)
    plan = dear.plan(batch)
    assert not any(plan.draft(s.seq_id).levels for s in batch) and plan.no_catch_up == {"s0", "s1"}
    assert "they decode plainly" in plan.reason

    unmeasured, replica = _planner(None)  # until a draft service has said what prompts cost it, drafting as before
    batch = _starting(replica)
    plan = unmeasured.plan(batch)
    assert all(plan.draft(s.seq_id).levels > 0 for s in batch) and "catch-up" not in plan.reason


def test_a_sequence_the_drafter_holds_is_not_priced_for_a_catch_up() -> None:
    dear, replica = _planner(100.0)
    batch = _starting(replica)
    for seq in batch:  # both past their first step, the drafter holding all but the last token
        seq.target_cached = seq.sessions[DRAFT_POOL].cached = PROMPT
        seq.tokens.append(7)
    plan = dear.plan(batch)
    assert all(plan.draft(s.seq_id).levels > 0 for s in batch) and "catch-up" not in plan.reason


@pytest.mark.parametrize(("draft_cpus", "priced"), [((0, 1), True), ((2, 3), False)], ids=["shared", "apart"])
def test_prompts_alongside_the_target_are_priced_on_its_cores_and_free_on_cores_of_their_own(
        draft_cpus: tuple[int, ...], priced: bool) -> None:
    planner, replica = _planner(100.0, alongside=True, target_cpus=(0, 1), draft_cpus=draft_cpus)
    batch = _starting(replica)
    plan = planner.plan(batch)
    assert not any(plan.draft(s.seq_id).levels for s in batch)  # alongside, the first step drafts nothing anyway
    assert plan.no_catch_up == ({"s0", "s1"} if priced else set())
    assert ("they decode plainly" in plan.reason) is priced


def test_the_draft_pool_sends_no_prompt_alongside_that_the_plan_says_will_not_catch_up() -> None:
    async def main() -> None:
        drafter = FakeDrafter()
        replica = DraftReplica("draft:1", drafter, ReplicaInfo("toy", "llamacpp", VOCAB, "toy", 512, 8))
        pool = DraftPool(2000.0, 60.0, RouterMetrics(), prefill_alongside=True)
        batch = _starting(replica)
        pool.start_prefills(batch, StepPlan({}, "", no_catch_up=frozenset({"s0"})))
        await asyncio.gather(*set(pool._prefilling.values()))
        assert [s.sessions[DRAFT_POOL].cached for s in batch] == [0, PROMPT]

    asyncio.run(main())


def _two_pools(rate_ms: float) -> tuple[Planner, list[LiveRequest]]:
    """A router with an n-gram pool (no KV cache) and a pool whose drafter keeps one, computing prompts at
    ``rate_ms`` a token, both measured as `_planner`'s; two sequences starting, drafting far better from the second."""
    config = RouterConfig(depth="auto", drafts="ngram=draft:1,model=draft:2", max_depth=4)
    policy = DepthPolicy(max_depth=4, min_gain=0.1)
    samples = [CostSample("target", b, 1.0 + d, 100.0 * b + 2.5 * d) for b in (1, 2) for d in range(5)
               for _ in range(3)]
    samples += [CostSample("draft", b, float(d), 5.0 * d, drafter=kind) for kind in ("llamacpp", "ngram")
                for b in (1, 2) for d in range(1, 6) for _ in range(3)]
    samples += [CostSample(PREFILL_ROLE, 2, 150.0, 300.0 * rate_ms, drafter="llamacpp")] * 3
    policy.update(samples, 900, 100)
    strategies = Strategies({name: DraftPool(2000.0, 60.0, RouterMetrics(), name) for name in ("ngram", "model")})
    planner = Planner(config, PolicyFeed(policy, None, 1.0, "throughput"), strategies, "target:1", 512)
    lookup = DraftReplica("draft:1", FakeDrafter(), ReplicaInfo("", "ngram", 0, "", 0, 0), pool="ngram")
    cached = DraftReplica("draft:2", FakeDrafter(), ReplicaInfo("toy", "llamacpp", VOCAB, "toy", 512, 8), pool="model")
    batch = []
    for i in range(2):
        seq = live_request(f"s{i}", list(range(PROMPT)), NEW_TOKENS, "ngram")
        seq.sessions = {"ngram": DraftSession(lookup, 0), "model": DraftSession(cached, 0)}
        seq.stats.by_pool["model"] = AcceptanceCounts(sequence_steps=100, accepted=300, rejections=30)
        seq.stats.by_pool["ngram"] = AcceptanceCounts(sequence_steps=100, accepted=5, rejections=95)
        batch.append(seq)
    return planner, batch


def test_with_several_pools_each_pools_catch_up_is_priced_in_its_own_right() -> None:
    """Beside an n-gram pool, a pool whose drafter must first compute the prompts is chosen where its catch-up pays
    and left out where it does not, with the reason said, and no prompt sent to it alongside."""
    cheap, batch = _two_pools(1.0)
    plan = cheap.plan(batch)
    assert all(s.strategy == "model" and plan.draft(s.seq_id).levels > 0 for s in batch) and not plan.no_catch_up
    assert "model: the draft's catch-up on 2 sequences (300 tokens, about 300 ms)" in plan.reason
    assert "it pays" in plan.reason

    dear, batch = _two_pools(100.0)  # 30 s of catching up
    plan = dear.plan(batch)
    assert not any(s.strategy == "model" and plan.draft(s.seq_id).levels > 0 for s in batch)
    assert plan.no_catch_up == {"s0", "s1"} and "they decode plainly" in plan.reason
