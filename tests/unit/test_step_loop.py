"""The real step loop, in process, behind in-process ports (`step_fakes`): greedy output equals plain decoding of
the toy model while requests join and leave, while the target loses a sequence, while the drafter fails, and
with strategies the loop has no code for (self-drafted, drafted ahead) in one batch."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from step_fakes import (
    VOCAB,
    FakeDrafter,
    FakeTarget,
    NoTracing,
    Recorder,
    ToyModel,
    live_request,
    streamed,
)

from router.draft_ahead import DraftAhead
from router.draft_pool import DraftPool
from router.live_request import DRAFT_POOL, DraftSession, FinishReason, LiveRequest, StreamChunk
from router.loop import StepLoop
from router.planner import Planner
from router.policy_feed import PolicyFeed
from router.ports import Proposer
from router.replicas import DraftReplica, ReplicaInfo, TargetReplica
from router.self_drafted import SELF_DRAFTED, SPACE, SelfDrafted
from router.strategies import Strategies
from router.target_verifier import TargetVerifier
from specfleet.config import RouterConfig
from specfleet.otel import RouterMetrics
from specfleet.policy import DepthPolicy
from specfleet.policy.costs import SelfDrafting
from specfleet.speculation import PREFILL_TOKENS, DraftPlan, Proposal, StepPlan, Verdict
from specfleet.stats import AcceptanceCounts, SequenceStep

PROMPTS = [[3, 1, 4], [1, 5, 9, 2, 6], [5, 3], [8, 9, 7, 9]]


class Harness:
    """A step loop over a `FakeTarget`, with the draft pool on a `FakeDrafter` and any other strategies."""

    def __init__(self, depth: int = 3, capacity: int = 8, extra: dict[str, Proposer] | None = None,
                 config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig(depth=str(depth), draft_retry_s=60.0)
        metrics = RouterMetrics()
        self.target = FakeTarget()
        self.drafter = FakeDrafter()
        self.draft = DraftReplica("draft:1", self.drafter)
        self.pool = DraftPool(self.config.draft_timeout_ms, self.config.draft_retry_s, metrics)
        self.strategies = Strategies({DRAFT_POOL: self.pool, **(extra or {})})
        feed = PolicyFeed(DepthPolicy.fixed(depth), None, 1.0, "throughput")
        planner = Planner(self.config, feed, self.strategies, "target:1", max_context=256)
        self.recorder = Recorder()
        self.loop = StepLoop("target:1", planner, self.strategies,
                             TargetVerifier(TargetReplica("target:1", self.target), 10.0, metrics), [self.recorder],
                             NoTracing(), capacity=capacity, max_context=256)

    def request(self, seq_id: str, prompt: list[int], max_new_tokens: int, strategy: str = DRAFT_POOL
                ) -> LiveRequest:
        return live_request(seq_id, prompt, max_new_tokens, strategy, self.draft if strategy == DRAFT_POOL else None)


async def _finish(seq: LiveRequest) -> list[int]:
    """The request's streamed tokens, once its last message came."""
    tokens, finish_reason = await streamed(seq, timeout_s=10)
    assert finish_reason == FinishReason.LENGTH
    return tokens


async def _serve(harness: Harness, seqs: list[LiveRequest], late: list[LiveRequest] = ()) -> list[list[int]]:
    """Runs the loop until every request is done; ``late`` ones join once the first step has run."""
    run = asyncio.get_running_loop().create_task(harness.loop.run())
    for seq in seqs:
        harness.loop.submit(seq)
    if late:
        while not harness.recorder.steps:
            await asyncio.sleep(0)
        for seq in late:
            harness.loop.submit(seq)
    outputs = await asyncio.gather(*(_finish(s) for s in [*seqs, *late]))
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    return outputs


def _plain(prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    return [ToyModel().generate(p, n) for p, n in zip(prompts, lengths, strict=True)]


def test_requests_join_and_leave_between_steps_and_output_equals_plain_decoding() -> None:
    harness = Harness(depth=3)
    lengths = [5, 20, 9, 14]
    first = [harness.request(f"s{i}", PROMPTS[i], lengths[i]) for i in range(2)]
    late = [harness.request(f"s{i}", PROMPTS[i], lengths[i]) for i in range(2, 4)]
    outputs = asyncio.run(_serve(harness, first, late))

    assert outputs == _plain(PROMPTS, lengths)
    sizes = [s.batch_size for s in harness.recorder.steps]
    assert sizes[0] == 2 and max(sizes) == 4 and sizes[-1] < 4  # joined after the first step; the short ones left
    assert sum(s.acceptance.accepted for s in harness.recorder.steps) > 0  # speculation did happen
    assert sorted(harness.target.released) == ["s0", "s1", "s2", "s3"]  # finished requests are freed on the target
    assert harness.drafter.sessions.cache == {}  # and on the drafter


def test_a_sequence_the_target_lost_is_sent_again_whole_and_loses_nothing() -> None:
    harness = Harness(depth=2)
    seqs = [harness.request(f"s{i}", PROMPTS[i], 16) for i in range(2)]

    class ForgetOnce:
        def observe(self, stats) -> None:
            if len(harness.recorder.steps) == 3:
                harness.target.sessions.forget("s1")  # as a restarted or evicting target would

    harness.loop.observers.insert(0, ForgetOnce())
    outputs = asyncio.run(_serve(harness, seqs))

    assert outputs == _plain(PROMPTS[:2], [16, 16])
    resent = [ask for call in harness.target.asks for ask in call if ask.delta.seq_id == "s1"
              and ask.delta.rollback_to == 0]
    assert len(resent) == 2  # its first prefill, and once more after the target lost it
    whole = resent[1].delta.new_tokens  # the whole context: the prompt and every token committed so far
    assert len(whole) > len(PROMPTS[1]) and whole == (PROMPTS[1] + outputs[1])[:len(whole)]


def test_a_failing_drafter_drops_the_step_to_plain_decoding_and_is_skipped_for_a_while() -> None:
    harness = Harness(depth=4)
    seqs = [harness.request(f"s{i}", PROMPTS[i], 12) for i in range(3)]

    class FailAtStep2:
        def observe(self, stats) -> None:
            if len(harness.recorder.steps) == 1:  # observing step 1 (the recorder comes after this observer)
                harness.drafter.fail_calls = 1

    harness.loop.observers.insert(0, FailAtStep2())
    outputs = asyncio.run(_serve(harness, seqs))

    assert outputs == _plain(PROMPTS[:3], [12] * 3)
    steps = harness.recorder.steps
    assert steps[2].deepest == 4 and steps[2].acceptance.drafted == 0  # planned drafts, got none: every sequence
    assert steps[2].acceptance.misses == 3  # missed and decoded plainly
    assert all(s.deepest == 0 for s in steps[3:])  # the failed draft is skipped (retry after 60 s)
    assert not harness.draft.available and harness.drafter.calls == 3


def test_strategies_the_loop_has_no_code_for_plug_in_and_keep_greedy_output() -> None:
    """Self-drafted (the target's verdict brings the next drafts) and drafted ahead (drafted while the target
    verifies), beside the draft pool in one batch, through the real loop."""
    self_drafted = SelfDrafted(max_drafts=3)
    harness = Harness(depth=3, extra={"self": self_drafted})
    metrics = RouterMetrics()
    ahead = DraftAhead(DraftPool(2000.0, 60.0, metrics, "ahead"), metrics)
    harness.strategies.strategies["ahead"] = ahead
    ahead_draft = DraftReplica("draft:2", FakeDrafter(wrong_every=7))
    lengths = [18, 24, 15, 21]
    seqs = [harness.request("pool", PROMPTS[0], lengths[0]),
            harness.request("self", PROMPTS[1], lengths[1], strategy="self"),
            live_request("ahead", PROMPTS[2], lengths[2], "ahead", ahead_draft),
            live_request("ahead-2", PROMPTS[3], lengths[3], "ahead", ahead_draft)]
    outputs = asyncio.run(_serve(harness, seqs))

    assert outputs == _plain(PROMPTS, lengths)
    assert seqs[1].stats.acceptance.accepted > 0  # drafts came with the verdicts, and were accepted
    assert ahead.outcomes["used"] > 0  # drafted while the target verified, and used
    accepted = {s.seq_id: s.stats.acceptance.accepted for s in seqs}
    assert all(n > 0 for n in accepted.values()), accepted


def test_a_self_drafted_sequence_whose_target_proposed_nothing_misses_and_one_without_candidates_starts() -> None:
    """A first step (nothing held) only drafts; a step after a verdict that proposed nothing (prompt lookup without a
    match) verifies an empty chain, which the policy must count as a miss: its offer rate is what it prices."""
    strategy = SelfDrafted(max_drafts=4)
    seq = live_request("s", PROMPTS[0], 8, SELF_DRAFTED, None)
    plan = StepPlan({"s": DraftPlan(3)}, "test")
    first = asyncio.run(strategy.propose([seq], plan))["s"]
    assert first.first and first.tokens == () and first.draft_next == 3
    strategy.settle([seq], {"s": Verdict((7,), 0)})  # asked to draft, proposed nothing
    assert strategy.holds_candidates("s")
    missed = asyncio.run(strategy.propose([seq], plan))["s"]
    assert not missed.first and missed.tokens == ()
    strategy.settle([seq], {"s": Verdict((7,), 0, next_proposal=Proposal((5, 6)))})
    assert asyncio.run(strategy.propose([seq], plan))["s"].tokens == (5, 6)
    asyncio.run(strategy.propose([seq], StepPlan({}, "plain")))  # a plain step: the next one starts again
    strategy.settle([seq], {"s": Verdict((8,), 0)})
    assert not strategy.holds_candidates("s")


def test_a_target_that_looks_candidates_up_is_asked_for_them_at_plain_steps_too() -> None:
    """Prompt lookup in the target costs a pass nothing, so a plain step asks for the next step's candidates as well:
    a drafting step after it has them, instead of starting empty."""
    strategy = SelfDrafted(max_drafts=4, drafting=SelfDrafting("ngram"))
    seq = live_request("s", PROMPTS[0], 8, SELF_DRAFTED, None)
    plain = asyncio.run(strategy.propose([seq], StepPlan({}, "plain")))["s"]
    assert plain.tokens == () and plain.draft_next == 4 and not plain.first
    assert not SequenceStep.of(0, plain, Verdict((7,), 0), 1).asked  # no drafts planned: no evidence
    strategy.settle([seq], {"s": Verdict((7,), 0, next_proposal=Proposal((5, 6, 7)))})
    drafting = asyncio.run(strategy.propose([seq], StepPlan({"s": DraftPlan(2)}, "test")))["s"]
    assert drafting.tokens == (5, 6) and not drafting.first
    assert not asyncio.run(SelfDrafted(max_drafts=4).propose([seq], StepPlan({}, "plain")))  # SPACE: masks cost


def test_looked_up_candidates_in_hand_bound_the_depth_and_are_priced_as_offered() -> None:
    """A target that looks its drafts up sends them before the step is planned: a sequence drafts at most those it
    holds (none while it holds none, its first step included), every step asks for as many as the target drafts
    whatever it used, and the policy prices the ones in hand as offered, however often the lookup missed before."""
    strategy = SelfDrafted(max_drafts=4, drafting=SelfDrafting("ngram"))
    seq, other = (live_request(name, PROMPTS[0], 32, SELF_DRAFTED, None) for name in ("s", "other"))
    assert strategy.room(seq) == 0 and not strategy.candidates_in_hand("s")
    asyncio.run(strategy.propose([seq, other], StepPlan({}, "plain")))
    strategy.settle([seq, other], {"s": Verdict((7,), 0, next_proposal=Proposal((5, 6))), "other": Verdict((7,), 0)})
    assert (strategy.room(seq), strategy.room(other)) == (2, 0)
    assert strategy.candidates_in_hand("s") and not strategy.candidates_in_hand("other")
    drafting = asyncio.run(strategy.propose([seq], StepPlan({"s": DraftPlan(2)}, "test")))["s"]
    assert drafting.tokens == (5, 6) and drafting.draft_next == 4  # not 2: asking costs nothing

    strategy.settle([seq], {"s": Verdict((5, 6, 8), 2, next_proposal=Proposal((9, 10, 11)))})
    for s in (seq, other):  # a lookup that mostly missed, and was right when it offered
        s.stats.acceptance = AcceptanceCounts(sequence_steps=70, accepted=40, rejections=2, misses=60)
    policy = DepthPolicy(max_depth=4)
    planner = Planner(RouterConfig(depth="auto", self_draft=True, max_depth=4),
                      PolicyFeed(policy, None, 1.0, "throughput"), Strategies({SELF_DRAFTED: strategy}), "target:1",
                      max_context=256)
    offers = planner._offer_counts([seq, other])
    assert offers == [None, (10, 60)]
    assert policy.offer_rates([(10, 60)])[0] < 0.5
    assert planner.depth_room(seq) == 3 and planner.depth_room(other) == 0
    in_hand, by_rate = (policy.choose([(40, 2)], [3], [counts]) for counts in offers)
    assert in_hand.depths == (3,) and in_hand.goodput > 1.5 * by_rate.goodput  # each step's drafts come for certain


def test_a_request_of_a_strategy_the_router_does_not_run_is_refused_with_its_name() -> None:
    harness = Harness()
    seq = harness.request("s0", PROMPTS[0], 4, strategy="nowhere")
    with pytest.raises(ValueError, match="'nowhere'"):
        asyncio.run(harness.strategies.propose([seq], harness.loop.planner.plan([seq])))


def test_the_loop_its_strategies_policy_and_stats_load_neither_protobuf_stubs_nor_torch() -> None:
    """Only the transport edge (the links, the servers) builds or reads protobuf; the model stays in the services."""
    modules = ("router.loop", "router.planner", "router.strategies", "router.draft_pool", "router.target_verifier",
               "router.live_request", "router.observers", "router.prediction_audit", "router.policy_feed",
               "specfleet.policy", "specfleet.stats", "specfleet.speculation")
    code = (f"import sys, {', '.join(modules)}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'google') or "
            "m.startswith('specfleet.v1')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_each_message_carries_the_stats_of_the_step_that_sent_it() -> None:
    harness = Harness(depth=3)
    seq = harness.request("s0", PROMPTS[1], 17)

    async def chunks() -> list[StreamChunk]:
        run = asyncio.get_running_loop().create_task(harness.loop.run())
        harness.loop.submit(seq)
        out = [await asyncio.wait_for(seq.outbox.get(), 10)]
        while out[-1].finish_reason is None:
            out.append(await asyncio.wait_for(seq.outbox.get(), 10))
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        return out

    messages = asyncio.run(chunks())
    for n, chunk in enumerate(messages, start=1):  # one message per step
        assert chunk.stats.steps == n
        sent = sum(len(c.token_ids) for c in messages[:n])
        assert chunk.stats.mean_tokens_per_step == sent / n
        assert chunk.stats.reason.startswith("pinned depth")  # 3, or what room the request has left
    last = messages[-1].stats
    assert last.accepted_tokens == seq.stats.acceptance.accepted and last.drafted_tokens == seq.stats.drafted


def test_with_two_draft_pools_each_sequence_moves_to_the_drafter_that_is_accepted() -> None:
    """Two pools behind one loop, the first one's drafts always wrong: the policy tries it (both look alike at
    first), measures each sequence's acceptance with it, and moves the sequences to the other pool, whose session of
    them starts from their tokens so far; the output is plain decoding's throughout."""
    config = RouterConfig(depth="auto", drafts="poor=draft:2,good=draft:1", draft_retry_s=60.0)
    metrics = RouterMetrics()
    good = DraftReplica("draft:1", FakeDrafter(wrong_every=1000), ReplicaInfo("toy", "model", VOCAB, "toy", 256, 8),
                        pool="good")
    poor = DraftReplica("draft:2", FakeDrafter(wrong_every=1), ReplicaInfo("toy", "ngram", VOCAB, "toy", 256, 8),
                        pool="poor")
    strategies = Strategies({name: DraftPool(config.draft_timeout_ms, config.draft_retry_s, metrics, name)
                             for name in ("poor", "good")})
    feed = PolicyFeed(DepthPolicy(max_depth=4, min_gain=0.0), None, 1.0, "throughput")
    recorder = Recorder()
    loop = StepLoop("target:1", Planner(config, feed, strategies, "target:1", max_context=256), strategies,
                    TargetVerifier(TargetReplica("target:1", FakeTarget()), 10.0, metrics), [recorder], NoTracing(),
                    capacity=8, max_context=256)
    harness = SimpleNamespace(loop=loop, recorder=recorder)
    lengths = [40, 36]
    seqs = [live_request(f"s{i}", PROMPTS[i], lengths[i], "poor") for i in range(2)]
    for seq in seqs:
        seq.sessions = {"poor": DraftSession(poor), "good": DraftSession(good)}
    outputs = asyncio.run(_serve(harness, seqs))  # type: ignore[arg-type]

    assert outputs == _plain(PROMPTS[:2], lengths)
    tried = [seq.stats.by_pool["poor"] for seq in seqs if "poor" in seq.stats.by_pool]
    assert tried and all(c.accepted == 0 and c.rejections > 0 for c in tried)
    for seq in seqs:
        kept = seq.stats.by_pool["good"]
        assert kept.accepted > 20 and seq.stats.last_pool == "good"
        assert seq.stats.last_reason.startswith("drafters ")
    # The steps count acceptance by drafter kind too (for the fleet's prior of each kind), as the pools' replicas said.
    by_kind = {kind: sum(s.acceptance_by_drafter[kind].accepted for s in recorder.steps
                         if kind in s.acceptance_by_drafter) for kind in ("ngram", "model")}
    assert by_kind["ngram"] == 0 and by_kind["model"] == sum(seq.stats.by_pool["good"].accepted for seq in seqs)
    assert set().union(*(s.acceptance_by_drafter for s in recorder.steps)) == {"ngram", "model"}


def test_a_pool_whose_cache_lags_by_more_than_the_tokens_left_is_left_out() -> None:
    """A drafter that keeps a KV cache must compute what it lacks of a sequence before drafting, and the whole step
    waits: a sequence may start on such a pool at its first step, or move to it while the catch-up is no longer than
    what it may still generate or than the prompts starting in the same step, not later."""
    config = RouterConfig(depth="auto", drafts="ngram=draft:1,sparse=draft:2")
    cached_model = ReplicaInfo("toy", "toy", VOCAB, "toy", 256, 8)  # a drafter that keeps a KV cache (8 slots)
    lookup = ReplicaInfo("", "ngram", 0, "", 0, 0)
    strategies = Strategies({name: DraftPool(config.draft_timeout_ms, config.draft_retry_s, RouterMetrics(), name)
                             for name in ("ngram", "sparse")})
    planner = Planner(config, PolicyFeed(DepthPolicy(max_depth=4, min_gain=0.0), None, 1.0, "throughput"),
                      strategies, "target:1", max_context=256)

    def sequence(seq_id: str, prompt_len: int, max_new: int, held_by_target: int, held_by_sparse: int) -> LiveRequest:
        seq = live_request(seq_id, list(range(prompt_len)), max_new, "ngram")
        seq.target_cached = held_by_target
        seq.sessions = {"ngram": DraftSession(DraftReplica("draft:1", FakeDrafter(), lookup, pool="ngram"),
                                              held_by_target),
                        "sparse": DraftSession(DraftReplica("draft:2", FakeDrafter(), cached_model, pool="sparse"),
                                               held_by_sparse)}
        # It drafts far better than the lookup: the policy wants it wherever it may have it.
        seq.stats.by_pool["sparse"] = AcceptanceCounts(sequence_steps=200, accepted=800, rejections=5)
        seq.stats.by_pool["ngram"] = AcceptanceCounts(sequence_steps=200, accepted=0, rejections=200)
        return seq

    def on_sparse(batch: list[LiveRequest]) -> dict[str, bool]:
        plan = planner.plan(batch)
        return {s.seq_id: s.strategy == "sparse" and plan.draft(s.seq_id).levels > 0 for s in batch}

    # "long" lags the sparse pool by 120 tokens and may generate 16 more.
    assert on_sparse([sequence("first-step", 60, 16, held_by_target=0, held_by_sparse=0),
                      sequence("short", 120, 16, held_by_target=119, held_by_sparse=110),
                      sequence("long", 120, 16, held_by_target=119, held_by_sparse=0)]) == {
        "first-step": True, "short": True, "long": False}
    # Beside 120 tokens of prompt starting, its catch-up is no longer than the step's own work.
    assert on_sparse([sequence("first-step", 120, 16, held_by_target=0, held_by_sparse=0),
                      sequence("long", 120, 16, held_by_target=119, held_by_sparse=0)]) == {
        "first-step": True, "long": True}


@pytest.mark.parametrize("depth", ["auto", "3"])
def test_one_pool_whose_cache_lags_by_more_than_the_tokens_left_is_left_out_unless_the_depth_is_pinned(
        depth: str) -> None:
    """With one draft pool too: after plain steps a sequence drafts again only while its drafter's catch-up is no
    longer than what it may still generate, or at its first step, or beside sequences starting in the step whose
    prompts are at least as long as the catch-up; a pinned depth drafts as told."""
    config = RouterConfig(depth=depth, drafts="draft:2", max_depth=3)
    pool = config.speculation_pools[0]
    cached_model = ReplicaInfo("toy", "toy", VOCAB, "toy", 256, 8)  # a drafter that keeps a KV cache (8 slots)
    strategies = Strategies({pool: DraftPool(config.draft_timeout_ms, config.draft_retry_s, RouterMetrics(), pool)})
    policy = DepthPolicy(max_depth=3, min_gain=0.0) if depth == "auto" else DepthPolicy.fixed(3)
    planner = Planner(config, PolicyFeed(policy, None, 1.0, "throughput"), strategies, "target:1", max_context=256)

    def sequence(seq_id: str, held_by_target: int, held_by_draft: int, length: int = 120) -> LiveRequest:
        seq = live_request(seq_id, list(range(length)), 16, pool,
                           DraftReplica("draft:2", FakeDrafter(), cached_model, pool=pool))
        seq.target_cached = held_by_target
        seq.sessions[pool].cached = held_by_draft
        seq.stats.acceptance = AcceptanceCounts(sequence_steps=200, accepted=800, rejections=5)
        return seq

    def drafting(batch: list[LiveRequest]) -> dict[str, bool]:
        plan = planner.plan(batch)
        return {s.seq_id: plan.draft(s.seq_id).levels > 0 for s in batch}

    # "long" lags its drafter by 120 tokens and may generate 16 more.
    assert drafting([sequence("short", 119, 110), sequence("long", 119, 0)]) == {
        "short": True, "long": depth != "auto"}
    assert drafting([sequence("first-step", 0, 0, length=60), sequence("long", 119, 0)]) == {
        "first-step": True, "long": depth != "auto"}
    # Beside 120 tokens of prompt starting, its catch-up is no longer than the step's own work.
    assert drafting([sequence("first-step", 0, 0), sequence("short", 119, 110), sequence("long", 119, 0)]) == {
        "first-step": True, "short": True, "long": True}


def test_a_sequence_with_no_draft_session_decodes_plainly_beside_named_pools() -> None:
    """A canary replay (or any request admitted with no draft session) runs in the same batch as sequences of a named
    pool, plainly, whatever strategy name it was built with."""
    config = RouterConfig(depth="3", drafts="ngram=draft:1", draft_retry_s=60.0)
    metrics = RouterMetrics()
    draft = DraftReplica("draft:1", FakeDrafter(), pool="ngram")
    strategies = Strategies({"ngram": DraftPool(config.draft_timeout_ms, config.draft_retry_s, metrics, "ngram")})
    feed = PolicyFeed(DepthPolicy.fixed(3), None, 1.0, "throughput")
    loop = StepLoop("target:1", Planner(config, feed, strategies, "target:1", max_context=256), strategies,
                    TargetVerifier(TargetReplica("target:1", FakeTarget()), 10.0, metrics), [Recorder()], NoTracing(),
                    capacity=8, max_context=256)
    drafting = live_request("d", PROMPTS[0], 12, "ngram", draft)
    plain = live_request("p", PROMPTS[1], 12)
    plain.sessions = {}
    outputs = asyncio.run(_serve(SimpleNamespace(loop=loop, recorder=Recorder()), [drafting, plain]))  # type: ignore[arg-type]
    assert outputs == _plain(PROMPTS[:2], [12, 12])
    assert plain.error is None and plain.stats.drafted == 0 and drafting.stats.drafted > 0


def test_a_self_drafting_router_prices_its_steps_as_the_targets_and_keeps_greedy_output() -> None:
    """--self-draft --depth auto: every sequence drafts with the target's own candidates, the policy prices the steps
    as SPACE steps (no draft call, the mask groups in the verify), and the tokens stay the target's."""
    config = RouterConfig(depth="auto", self_draft=True, max_depth=4)
    metrics = RouterMetrics()
    target = FakeTarget()
    strategies = Strategies({SELF_DRAFTED: SelfDrafted(max_drafts=4)})
    policy = DepthPolicy(max_depth=4)
    asked: list[str | None] = []
    choose = policy.choose

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(inspect.signature(choose).bind(*args, **kwargs).arguments.get("drafter"))
        return choose(*args, **kwargs)

    policy.choose = spy  # type: ignore[method-assign]
    planner = Planner(config, PolicyFeed(policy, None, 1.0, "throughput"), strategies, "target:1", max_context=256)
    recorder = Recorder()
    harness = Harness()
    harness.loop = StepLoop("target:1", planner, strategies, TargetVerifier(TargetReplica("target:1", target), 10.0,
                                                                            metrics), [recorder], NoTracing(),
                            capacity=8, max_context=256)
    harness.recorder = recorder
    lengths = [20, 16]
    seqs = [live_request(f"s{i}", PROMPTS[i], lengths[i], SELF_DRAFTED, None) for i in range(2)]
    outputs = asyncio.run(_serve(harness, seqs))

    assert outputs == _plain(PROMPTS[:2], lengths)
    assert set(asked) == {SPACE}
    asks = [ask for call in target.asks for ask in call]
    assert any(ask.proposal is not None and ask.proposal.draft_next for ask in asks)  # the target was asked to draft
    # The first step drafts with no candidates to verify (its prediction leaves that out, as a prefill's leaves out
    # the prompt): it stays out of the audit. The prompts are too short to count as prefills, and no draft service
    # holds these sequences, so every later step is audited and calibrates the hurdle (the sequences outgrow
    # PREFILL_TOKENS, so a check of a draft cache that is not there would call them prefills).
    assert all(len(p) <= PREFILL_TOKENS for p in PROMPTS[:2]) and max(lengths) + 5 > PREFILL_TOKENS
    assert recorder.steps[0].prefilled and recorder.steps[0].drafted
    later = recorder.steps[1:]
    assert any(step.drafted for step in later) and not any(step.prefilled for step in later), later
