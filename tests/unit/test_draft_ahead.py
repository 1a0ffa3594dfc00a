"""Drafting ahead (`router.draft_ahead`) in the real step loop, behind in-process ports: greedy output equals plain
decoding while drafts made ahead are used and dropped, a dropped draft leaves nothing behind on the drafter, and
sampled output keeps the target's distribution (tiny vocabulary, chi-square), which a q off by one position fails."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import torch
from chi_square import chi_square_pvalue
from step_fakes import FakeDrafter, FakeService, FakeTarget, NoTracing, Recorder, ToyModel, live_request, run_loop

import router.draft_ahead as draft_ahead
from router.draft_ahead import Ahead, DraftAhead, usable_ahead
from router.draft_pool import DraftPool
from router.live_request import DRAFT_POOL, LiveRequest
from router.loop import StepLoop
from router.planner import Planner
from router.policy_feed import PolicyFeed
from router.replicas import DraftReplica, ReplicaInfo, TargetReplica
from router.strategies import Strategies
from router.target_verifier import TargetVerifier
from specfleet.config import RouterConfig
from specfleet.otel import RouterMetrics
from specfleet.policy import DepthPolicy
from specfleet.sampling_params import SamplingParams
from specfleet.speculation import DraftAsk, DraftPlan, Proposal, SessionReply, TopK, Verdict, VerifyAsk
from specfleet.verify import verify_chain

PROMPTS = [[3, 1, 4], [1, 5, 9, 2, 6], [5, 3], [8, 9, 7, 9], [2, 7, 1, 8], [4, 4], [6, 2, 6, 4, 3], [9, 1]]


class WatchedDrafter(FakeDrafter):
    """A drafter that checks that drafts made ahead and dropped leave nothing behind: each call that drafts now (at
    the step's depth; calls made ahead ask one more) leaves it holding exactly the sequence's committed tokens."""

    def __init__(self, seqs: dict[str, LiveRequest], target: FakeTarget, depth: int) -> None:
        super().__init__(wrong_every=7)  # wrong often enough to drop drafts made ahead, right enough to use them
        self.seqs, self.target, self.depth = seqs, target, depth
        self.overlapped = 0  # calls made while a verify was in flight: drafting ahead

    async def propose(self, asks: list[DraftAsk], timeout_s: float) -> SessionReply[Proposal]:
        self.overlapped += self.target.calls_in_flight > 0
        for ask in asks:
            if ask.plan.levels == self.depth:
                held = self.sessions.cache.get(ask.delta.seq_id, [])[: ask.delta.rollback_to] + ask.delta.new_tokens
                assert held == self.seqs[ask.delta.seq_id].tokens, f"{ask.delta.seq_id}: the drafter kept stale tokens"
        return await super().propose(asks, timeout_s)


def _step_loop(strategy: DraftAhead, target: object, depth: int, capacity: int) -> StepLoop:
    config = RouterConfig(depth=str(depth), draft_retry_s=60.0)
    strategies = Strategies({DRAFT_POOL: strategy})
    feed = PolicyFeed(DepthPolicy.fixed(depth), None, 1.0, "throughput")
    planner = Planner(config, feed, strategies, "target:1", max_context=256)
    verifier = TargetVerifier(TargetReplica("target:1", target), 10.0, RouterMetrics())
    return StepLoop("target:1", planner, strategies, verifier, [Recorder()], NoTracing(), capacity=capacity,
                    max_context=256)


@pytest.mark.parametrize("depth", [1, 3])
def test_greedy_output_is_plain_decoding_with_drafts_made_ahead_used_and_dropped(depth: int) -> None:
    async def main() -> None:
        metrics = RouterMetrics()
        target = FakeTarget()
        seqs: dict[str, LiveRequest] = {}
        drafter = WatchedDrafter(seqs, target, depth)
        replica = DraftReplica("draft:1", drafter)
        strategy = DraftAhead(DraftPool(2000.0, 60.0, metrics), metrics)
        loop = _step_loop(strategy, target, depth, capacity=4)  # 8 requests: some wait, join later
        for i, prompt in enumerate(PROMPTS):
            seqs[f"s{i}"] = live_request(f"s{i}", prompt, 24, draft=replica)
        outputs = await run_loop(loop, list(seqs.values()))
        model = ToyModel()
        assert outputs == [model.generate(prompt, 24) for prompt in PROMPTS]
        assert strategy.outcomes["used"] > 0 and strategy.outcomes["dropped"] > 0
        assert drafter.overlapped > 0  # drafted while the target verified
        assert sorted(drafter.released) == sorted(seqs)  # released once their calls made ahead answered
        assert not drafter.sessions.cache and not strategy._ahead

    asyncio.run(main())


def _ahead(context: list[int], position: int, held: int = 0) -> Ahead:
    return Ahead(draft=None, context=context, position=position, held=held, task=None)  # type: ignore[arg-type]


def test_drafts_made_ahead_are_used_only_when_every_draft_and_the_guess_came_true() -> None:
    # Committed [1, 2]; step drafts [3, 4]; made ahead: [5 (the guess of the bonus token), 6, 7].
    ahead = _ahead([1, 2, 3, 4], position=2, held=3)
    made = Proposal((5, 6, 7), (TopK((5,), (1.0,)), TopK((6,), (1.0,)), TopK((7,), (1.0,))))
    reply = (made, 6)  # the drafter then held the context and 5, 6 (it does not feed itself its last draft)

    proposal, held = usable_ahead([1, 2, 3, 4, 5], ahead, reply, DraftPlan(2))
    assert proposal == Proposal((6, 7), made.draft_top_k[1:]) and held == 5
    proposal, _ = usable_ahead([1, 2, 3, 4, 5], ahead, reply, DraftPlan(1))
    assert proposal is not None and proposal.tokens == (6,)  # no more than this step plans
    # Every draft accepted, but the target's own token is not the guess: dropped, rolled back before the guess.
    assert usable_ahead([1, 2, 3, 4, 8], ahead, reply, DraftPlan(2)) == (None, 4)
    # A draft rejected: dropped, rolled back to the tokens both hold.
    assert usable_ahead([1, 2, 3, 9], ahead, reply, DraftPlan(2)) == (None, 3)
    assert usable_ahead([1, 2, 9], ahead, reply, DraftPlan(2)) == (None, 2)
    # The call failed: the drafter holds at least what it held when asked, no more than was committed.
    assert usable_ahead([1, 2, 3, 4, 5], ahead, (None, 0), DraftPlan(2)) == (None, 3)
    assert usable_ahead([1, 2, 9], ahead, (None, 0), DraftPlan(2)) == (None, 2)
    # Planned to draft nothing, or a tree: nothing to use, but the session still moves on.
    assert usable_ahead([1, 2, 3, 4, 5], ahead, reply, DraftPlan(0)) == (None, 5)


# -- sampled: the target's distribution is kept ---------------------------------------------------------------------

VOCAB = 3
NEW_TOKENS = 4
# Bigram models (row: the last token). Both favour the token after the last one, the draft more sharply, so drafts
# are often accepted and drafts made ahead often used; and one position's q differs from the next one's, so a q sent
# for the wrong position shows.
TARGET_LOGITS = torch.tensor([[0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.5]])
DRAFT_LOGITS = 2.0 * torch.eye(VOCAB).roll(1, dims=1)

def _dist(table: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    return table[tokens[-1]].softmax(-1)


@dataclass
class SampledTarget(FakeTarget):
    """A `TargetLink` that verifies sampled chains by `verify_chain` against a tiny bigram model."""

    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(1))

    async def verify(self, asks: list[VerifyAsk], timeout_s: float) -> SessionReply[Verdict]:
        self.calls_in_flight += 1
        await asyncio.sleep(0)
        self.calls_in_flight -= 1
        reply = SessionReply[Verdict]({}, {}, [], 1.0)
        for ask in asks:
            tokens = self.sessions.apply(ask.delta.seq_id, ask.delta.rollback_to, ask.delta.new_tokens)
            assert tokens is not None
            drafts = list(ask.proposal.tokens) if ask.proposal is not None else []
            target = torch.stack([_dist(TARGET_LOGITS, tokens + drafts[:i]) for i in range(len(drafts) + 1)])
            draft = torch.zeros(len(drafts), VOCAB)
            for i, top_k in enumerate(ask.proposal.draft_top_k if ask.proposal is not None else ()):
                draft[i, list(top_k.token_ids)] = torch.tensor(top_k.probs)
            result = verify_chain(target[None], torch.tensor([drafts], dtype=torch.long).reshape(1, -1),
                                  draft[None], torch.tensor([len(drafts)]),
                                  torch.rand(1, len(drafts) + 1, generator=self.generator, dtype=torch.float64))
            accepted = int(result.accepted_counts[0])
            emitted = tuple(result.output_tokens[0, : accepted + 1].tolist())
            reply.answers[ask.delta.seq_id] = Verdict(emitted, accepted)
            self.sessions.cache[ask.delta.seq_id] = tokens + list(emitted[:-1])
            reply.cached_len[ask.delta.seq_id] = len(tokens) + accepted
        return reply


@dataclass
class SampledDrafter(FakeService):
    """A `DraftLink` drawing chains from a different tiny bigram model, with the exact q of each token."""

    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(2))
    kind = "model"

    async def propose(self, asks: list[DraftAsk], timeout_s: float) -> SessionReply[Proposal]:
        await asyncio.sleep(0)
        reply = SessionReply[Proposal]({}, {}, [], 0.5)
        for ask in asks:
            tokens = self.sessions.apply(ask.delta.seq_id, ask.delta.rollback_to, ask.delta.new_tokens)
            assert tokens is not None
            drafts, qs = [], []
            for _ in range(ask.plan.levels):
                q = _dist(DRAFT_LOGITS, tokens + drafts)
                drafts.append(int(torch.multinomial(q, 1, generator=self.generator)))
                qs.append(TopK(tuple(range(VOCAB)), tuple(q.tolist())))
            self.sessions.cache[ask.delta.seq_id] = tokens + drafts[:-1]
            reply.answers[ask.delta.seq_id] = Proposal(tuple(drafts), tuple(qs))
            reply.cached_len[ask.delta.seq_id] = len(tokens) + max(0, len(drafts) - 1)
        return reply

    async def info(self, timeout_s: float) -> ReplicaInfo:
        return ReplicaInfo("toy", self.kind, VOCAB, "toy", max_seq_len=256, num_slots=64)


def _q_one_position_late(tokens: list[int], ahead: Ahead, reply: draft_ahead.AheadReply, plan: DraftPlan
                         ) -> tuple[Proposal | None, int]:
    """A wrong `usable_ahead`: the drafts made ahead with each one's q taken from the token before it."""
    proposal, held = usable_ahead(tokens, ahead, reply, plan)
    if proposal is None:
        return proposal, held
    return Proposal(proposal.tokens, reply[0].draft_top_k[: len(proposal.tokens)]), held


def _sampled_outputs(sequences: int) -> torch.Tensor:  # [sequences, NEW_TOKENS]
    async def main() -> list[list[int]]:
        metrics = RouterMetrics()
        replica = DraftReplica("draft:1", SampledDrafter())
        strategy = DraftAhead(DraftPool(2000.0, 60.0, metrics), metrics)
        loop = _step_loop(strategy, SampledTarget(), depth=1, capacity=64)
        seqs = []
        for i in range(sequences):
            seq = live_request(f"s{i}", [0], NEW_TOKENS, draft=replica)
            seq.sampling = SamplingParams(temperature=1.0)
            seqs.append(seq)
        outputs = await run_loop(loop, seqs)
        assert strategy.outcomes["used"] > sequences // 4  # the drafts made ahead were used often
        return outputs

    return torch.tensor(asyncio.run(main()))


def _exact_counts(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed counts of each NEW_TOKENS-token output, and the counts the target alone gives them."""
    cells = VOCAB ** NEW_TOKENS
    index = sum(outputs[:, i] * VOCAB ** (NEW_TOKENS - 1 - i) for i in range(NEW_TOKENS))
    observed = torch.bincount(index, minlength=cells).double()
    expected = torch.zeros(cells, dtype=torch.float64)
    for cell in range(cells):
        tokens = [0] + [cell // VOCAB ** (NEW_TOKENS - 1 - i) % VOCAB for i in range(NEW_TOKENS)]
        expected[cell] = float(torch.prod(torch.stack(
            [_dist(TARGET_LOGITS, tokens[: i + 1])[tokens[i + 1]] for i in range(NEW_TOKENS)])))
    return observed, expected * len(outputs)


def test_sampled_output_keeps_the_target_distribution() -> None:
    observed, expected = _exact_counts(_sampled_outputs(3000))
    assert chi_square_pvalue(observed, expected) > 1e-3


def test_the_same_test_catches_drafts_made_ahead_with_the_wrong_q(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(draft_ahead, "usable_ahead", _q_one_position_late)
    observed, expected = _exact_counts(_sampled_outputs(3000))
    assert chi_square_pvalue(observed, expected) < 1e-3
