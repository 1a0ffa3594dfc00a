"""`--prefill-alongside` in the real step loop, behind in-process ports: a sequence's first step verifies no drafts
and sends its prompt to its drafter while the target computes it too; drafting starts once the drafter has it,
without the step ever waiting for it, and greedy output stays plain decoding (with a pool and drafting ahead)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from step_fakes import VOCAB, FakeDrafter, FakeTarget, NoTracing, Recorder, ToyModel, live_request, run_loop

from router.draft_ahead import DraftAhead
from router.draft_pool import DraftPool
from router.live_request import DRAFT_POOL
from router.loop import StepLoop
from router.planner import Planner
from router.policy_feed import PolicyFeed
from router.replicas import DraftReplica, ReplicaInfo, TargetReplica
from router.strategies import Strategies
from router.target_verifier import TargetVerifier
from specfleet.config import RouterConfig
from specfleet.otel import RouterMetrics
from specfleet.policy import DepthPolicy
from specfleet.speculation import DraftAsk, Proposal, SessionReply

PROMPTS = [[3, 1, 4], [1, 5, 9, 2, 6], [5, 3], [8, 9, 7, 9], [2, 7, 1, 8], [4, 4], [6, 2, 6, 4, 3], [9, 1]]
DEPTH = 3


@dataclass
class WatchedDrafter(FakeDrafter):
    """Records each call's entries and whether the target was verifying meanwhile; ``hold_prompts`` keeps its calls
    that draft nothing (prompts computed beside the target) from answering until it is set."""

    target: FakeTarget = field(default_factory=FakeTarget)
    hold_prompts: asyncio.Event | None = None
    entries: list[tuple[str, int, int, int]] = field(default_factory=list)  # seq_id, rollback_to, new, levels
    prompt_calls: int = 0  # calls that drafted nothing
    beside_verify: int = 0  # of those, made while a verify was in flight

    async def propose(self, asks: list[DraftAsk], timeout_s: float) -> SessionReply[Proposal]:
        self.entries.extend((a.delta.seq_id, a.delta.rollback_to, len(a.delta.new_tokens), a.plan.levels)
                            for a in asks)
        if all(a.plan.levels == 0 for a in asks):
            self.prompt_calls += 1
            self.beside_verify += self.target.calls_in_flight > 0
            if self.hold_prompts is not None:
                await self.hold_prompts.wait()
        return await super().propose(asks, timeout_s)


def _replica(drafter: FakeDrafter, num_slots: int = 8) -> DraftReplica:
    return DraftReplica("draft:1", drafter, ReplicaInfo("toy", drafter.kind, VOCAB, "toy", 256, num_slots))


def _pool(retry_s: float = 60.0) -> DraftPool:
    return DraftPool(2000.0, retry_s, RouterMetrics(), prefill_alongside=True)


def _step_loop(strategy: DraftPool | DraftAhead, target: FakeTarget) -> StepLoop:
    config = RouterConfig(depth=str(DEPTH), draft_retry_s=60.0, prefill_alongside=True)
    strategies = Strategies({DRAFT_POOL: strategy})
    feed = PolicyFeed(DepthPolicy.fixed(DEPTH), None, 1.0, "throughput")
    planner = Planner(config, feed, strategies, "target:1", max_context=256)
    verifier = TargetVerifier(TargetReplica("target:1", target), 10.0, RouterMetrics())
    return StepLoop("target:1", planner, strategies, verifier, [Recorder()], NoTracing(), capacity=4,
                    max_context=256)


def _drafts_by_verify(target: FakeTarget, seq_id: str) -> list[int]:
    """How many drafts each of the target's calls carried for ``seq_id``, in order."""
    return [len(a.proposal.tokens) if a.proposal else 0 for call in target.asks for a in call
            if a.delta.seq_id == seq_id]


@pytest.mark.parametrize("ahead", [False, True], ids=["pool", "drafting ahead"])
def test_prompts_reach_the_drafter_while_the_target_computes_them_and_drafting_follows(ahead: bool) -> None:
    async def main() -> None:
        target, pool = FakeTarget(), _pool()
        drafter = WatchedDrafter(target=target)
        strategy = DraftAhead(pool, RouterMetrics()) if ahead else pool
        replica = _replica(drafter)
        seqs = [live_request(f"s{i}", p, 24, draft=replica) for i, p in enumerate(PROMPTS)]
        outputs = await run_loop(_step_loop(strategy, target), seqs)  # 8 requests, 4 at a time: some join later

        assert outputs == [ToyModel().generate(p, 24) for p in PROMPTS]
        for seq in seqs:
            drafts = _drafts_by_verify(target, seq.seq_id)
            assert drafts[0] == 0 and max(drafts) == DEPTH  # its first step verified none; later ones drafted
            calls = [e for e in drafter.entries if e[0] == seq.seq_id]
            assert calls[0] == (seq.seq_id, 0, seq.prompt_len, 0)  # the prompt, drafting nothing
            assert [c for c in calls if c[1] == 0] == calls[:1]  # and never again from scratch
        assert drafter.beside_verify == drafter.prompt_calls > 0  # each while the target computed them too
        assert sorted(drafter.released) == sorted(s.seq_id for s in seqs) and not pool._prefilling

    asyncio.run(main())


def test_a_drafter_still_computing_a_prompt_holds_back_no_step() -> None:
    async def main() -> None:
        target, pool = FakeTarget(), _pool()
        drafter = WatchedDrafter(target=target, hold_prompts=asyncio.Event())
        seq = live_request("s0", PROMPTS[1], 24, draft=_replica(drafter))

        async def release_after_five_verifies() -> None:
            while len(target.asks) < 5:
                await asyncio.sleep(0)
            drafter.hold_prompts.set()

        releaser = asyncio.get_running_loop().create_task(release_after_five_verifies())
        outputs = await run_loop(_step_loop(pool, target), [seq])
        await releaser

        assert outputs == [ToyModel().generate(PROMPTS[1], 24)]
        drafts = _drafts_by_verify(target, "s0")
        assert drafts[:5] == [0] * 5 and max(drafts) == DEPTH  # plain steps while it computed, then drafts
        # Once it has the prompt, the next call sends only what was committed since.
        calls = [e for e in drafter.entries if e[0] == "s0"]
        assert calls[0][1:] == (0, len(PROMPTS[1]), 0) and calls[1][1] == len(PROMPTS[1])

    asyncio.run(main())


def test_a_failed_prompt_call_is_sent_again_when_the_sequence_drafts() -> None:
    async def main() -> None:
        target, pool = FakeTarget(), _pool(retry_s=0.0)
        drafter = WatchedDrafter(target=target, fail_calls=1)
        seq = live_request("s0", PROMPTS[3], 16, draft=_replica(drafter))
        outputs = await run_loop(_step_loop(pool, target), [seq])

        assert outputs == [ToyModel().generate(PROMPTS[3], 16)]
        calls = [e for e in drafter.entries if e[0] == "s0"]
        assert calls[0][1:] == (0, len(PROMPTS[3]), 0)  # failed: the drafter holds nothing
        assert calls[1][1] == 0 and calls[1][3] == DEPTH  # so its first drafting call sends everything
        assert max(_drafts_by_verify(target, "s0")) == DEPTH

    asyncio.run(main())


def test_a_drafter_without_a_kv_cache_drafts_from_the_first_step() -> None:
    async def main() -> None:
        target, pool = FakeTarget(), _pool()
        drafter = WatchedDrafter(target=target)
        seq = live_request("s0", PROMPTS[0], 8, draft=_replica(drafter, num_slots=0))  # prompt lookup keeps none
        await run_loop(_step_loop(pool, target), [seq])

        assert _drafts_by_verify(target, "s0")[0] == DEPTH
        assert all(levels > 0 for *_, levels in drafter.entries)

    asyncio.run(main())


def test_a_request_with_no_step_left_to_draft_in_sends_its_drafter_nothing() -> None:
    async def main() -> None:
        target, pool = FakeTarget(), _pool()
        drafter = WatchedDrafter(target=target)
        seq = live_request("s0", PROMPTS[0], 2, draft=_replica(drafter))
        outputs = await run_loop(_step_loop(pool, target), [seq])

        assert outputs == [ToyModel().generate(PROMPTS[0], 2)]
        assert drafter.entries == []  # two tokens: the first step's and the second's, neither after drafts

    asyncio.run(main())
