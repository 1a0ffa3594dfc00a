"""The router when replicas leave or fail mid-step: no sequence keeps a replica that has gone, and no request fails
for it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from step_fakes import VOCAB, FakeDrafter, FakeTarget, Sessions, ToyModel, live_request

import router.fleet as fleet_module
from router.draft_pool import DraftPool
from router.fleet import Fleet, connect_draft, connect_target, step_loop_for
from router.live_request import DRAFT_POOL, LiveRequest
from router.policy_feed import PolicyFeed
from router.replicas import DraftReplica, ReplicaError, ReplicaInfo, TargetReplica
from specfleet.config import RouterConfig
from specfleet.otel import RouterMetrics
from specfleet.policy import DepthPolicy
from specfleet.sampling_params import SamplingParams
from specfleet.speculation import DraftPlan, SessionReply, StepPlan, Verdict, VerifyAsk

# Nothing listens here: Release calls to a replica that left fail, as they may, and are not waited for.
NOWHERE = "127.0.0.1:9"


def _sequence(seq_id: str, draft: DraftReplica) -> LiveRequest:
    seq = LiveRequest(request_id=seq_id, seq_id=seq_id, tokens=[1, 2, 3], prompt_len=3, sampling=SamplingParams(),
                   seed=0, max_new_tokens=8, eos_ids=frozenset(), ignore_eos=True, detokenizer=None, stops=None)
    seq.draft = draft
    draft.assigned += 1
    return seq


def test_a_draft_leaving_while_a_target_leaves_moves_the_targets_sequences_off_it_too() -> None:
    async def scenario() -> tuple[list[LiveRequest], DraftReplica]:
        info = ReplicaInfo("toy", "target", 97, "toy", max_seq_len=64, num_slots=4)
        fleet = Fleet(RouterConfig(depth="4", targets="a:1,b:2", drafts="d:1,e:2"), feed=None, telemetry=None,
                      metrics=RouterMetrics())
        leaving_draft, staying_draft = connect_draft(NOWHERE), connect_draft(NOWHERE)
        leaving_draft.address, staying_draft.address = "d:1", "e:2"
        fleet.drafts = [leaving_draft, staying_draft]
        for address in ("a:1", "b:2"):
            target = connect_target(NOWHERE)
            target.address, target.info = address, info
            fleet.loops[address] = step_loop_for(target, fleet.config, None, None, fleet.metrics)
            fleet.targets[address] = target
            # A run stuck at an await, as a step waiting for its Verify is.
            fleet._runs[address] = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
        moving = [_sequence(f"s{i}", leaving_draft) for i in range(3)]
        fleet.loops["a:1"].live.extend(moving)

        # The target leaves; while its step is being cancelled, the draft leaves too.
        target_left = asyncio.get_running_loop().create_task(fleet._remove_target("a:1"))
        await asyncio.sleep(0)  # _remove_target now waits for the cancelled run
        await fleet._reconcile_drafts(DRAFT_POOL, frozenset({"e:2"}))
        await target_left
        assert [s.seq_id for s in fleet.loops["b:2"].waiting] == [s.seq_id for s in moving]
        await fleet.stop()
        return moving, staying_draft

    moving, staying_draft = asyncio.run(scenario())
    # Re-pinned to the draft that stays (which prefills them), and placed on the target that stays.
    assert all(seq.draft is staying_draft and seq.draft_cached == 0 for seq in moving)
    assert staying_draft.assigned == len(moving)


def test_a_step_whose_draft_left_since_it_began_runs_without_drafts() -> None:
    async def scenario() -> dict:
        pool = DraftPool(timeout_ms=1000, retry_s=1.0, metrics=RouterMetrics())
        draft = connect_draft(NOWHERE)
        await draft.link.close()  # the fleet closes a draft's channel once it has left
        seq = _sequence("s0", draft)
        return dict(await pool.propose([seq], StepPlan({"s0": DraftPlan(4)}, "pinned")))

    assert asyncio.run(scenario()) == {}


@dataclass
class DyingTarget(FakeTarget):
    """A fake target that can be killed and brought back: while dead, calls fail as gRPC says an unreachable
    server fails (UNAVAILABLE) and GetInfo finds nobody."""

    alive: bool = True
    calls: int = 0
    die_after_calls: int = 0  # 0: never by itself

    async def verify(self, asks: list[VerifyAsk], timeout_s: float) -> SessionReply[Verdict]:
        self.calls += 1
        if self.die_after_calls and self.calls > self.die_after_calls:
            self.alive = False
        if not self.alive:
            self.sessions = Sessions()  # a restart loses every cache
            raise ReplicaError("UNAVAILABLE", "failed to connect to all addresses")
        return await super().verify(asks, timeout_s)

    async def info(self, timeout_s: float) -> ReplicaInfo:
        if not self.alive:
            raise ConnectionError("no answer from the target")
        return await super().info(timeout_s)


def test_a_target_that_stops_answering_costs_a_re_prefill_and_rejoins_when_back(monkeypatch) -> None:
    """A fixed pool of two: one target dies mid-generation. Its sequences move to the other one (re-prefilled, output
    unchanged, nothing failed), new requests go only to the live one, and the dead one rejoins once it answers."""
    dying, staying = DyingTarget(die_after_calls=3), DyingTarget()
    fakes = _fixed_pool(monkeypatch, {"a:1": dying, "b:2": staying})
    model = ToyModel()

    async def scenario() -> tuple[list[list[int]], list[list[int]], Fleet]:
        fleet = await _fleet_over(fakes, RouterConfig(depth="3", targets="a:1,b:2", drafts="d:1"))
        draft = DraftReplica("d:1", FakeDrafter(), ReplicaInfo("toy", "model", VOCAB, "toy", 256, 8))
        fleet.drafts = [draft]
        first = [live_request(f"s{i}", [i + 1, i + 2], 12, draft=draft) for i in range(4)]
        for seq in first:
            fleet.loops["a:1"].submit(seq)
        await _until(lambda: "a:1" not in fleet.loops)  # it died and left
        later = [live_request(f"t{i}", [i + 5, i + 6], 6, draft=draft) for i in range(2)]
        for seq in later:
            fleet.place(seq)
        await _until(lambda: all(s.finished for s in [*first, *later]))
        assert all(s.error is None and s.moves == 1 for s in first) and all(s.moves == 0 for s in later)
        assert staying.calls > 0 and "a:1" in fleet._joining_targets  # asked again, with backoff
        dying.alive, dying.die_after_calls = True, 0
        await _until(lambda: "a:1" in fleet.loops)
        await fleet.stop()
        return [s.generated for s in first], [s.generated for s in later], fleet

    first, later, fleet = asyncio.run(scenario())
    assert first == [model.generate([i + 1, i + 2], 12) for i in range(4)]
    assert later == [model.generate([i + 5, i + 6], 6) for i in range(2)]


def test_a_request_that_lost_its_target_too_often_fails_with_the_reason(monkeypatch) -> None:
    fakes = _fixed_pool(monkeypatch, {"a:1": DyingTarget(die_after_calls=1)})

    async def scenario() -> LiveRequest:
        fleet = await _fleet_over(fakes, RouterConfig(depth="0", targets="a:1", max_moves=0))
        seq = live_request("s0", [1, 2], 8)
        fleet.place(seq)
        await _until(lambda: seq.finished)
        await fleet.stop()
        return seq

    seq = asyncio.run(scenario())
    assert seq.error is not None and seq.error.code.name == "UNAVAILABLE" and "--max-moves 0" in seq.error.message


def _fixed_pool(monkeypatch, fakes: dict[str, FakeTarget]) -> dict[str, FakeTarget]:
    """A fixed pool of fake targets, by address: connecting to an address reaches its fake, and a lost one is asked
    again within milliseconds."""
    monkeypatch.setattr(fleet_module, "JOIN_RETRY_S", (0.01, 0.05))
    monkeypatch.setattr(fleet_module, "connect_target", lambda address, interceptors=(): TargetReplica(
        address, fakes[address]))
    return fakes


async def _fleet_over(fakes: dict[str, FakeTarget], config: RouterConfig) -> Fleet:
    """A fleet running a step loop on each fake target (the first is the reference), at the config's fixed depth."""
    fleet = Fleet(config, PolicyFeed(DepthPolicy.fixed(int(config.depth)), None, 1.0, "throughput"), None,
                  RouterMetrics())
    for address, fake in fakes.items():
        fleet._add_target(TargetReplica(address, fake, await fake.info(1)))
    fleet.reference, fleet._wanted_targets = fleet.targets[next(iter(fakes))], frozenset(fakes)
    return fleet


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


@dataclass
class DrainingTarget(FakeTarget):
    """A fake target that can be told to shut down: its replies and its info then say so."""

    draining: bool = False
    drain_at_call: int = 0  # the call whose reply first says so (0: only when told)

    async def verify(self, asks: list[VerifyAsk], timeout_s: float) -> SessionReply[Verdict]:
        reply = await super().verify(asks, timeout_s)
        if self.drain_at_call and len(self.asks) >= self.drain_at_call:
            self.draining, self.drain_at_call = True, 0  # SIGTERM, at a known point of the generation
        reply.draining = self.draining
        return reply

    async def info(self, timeout_s: float) -> ReplicaInfo:
        info = await super().info(timeout_s)
        return ReplicaInfo(**{**info.__dict__, "draining": self.draining})


def test_a_target_shutting_down_finishes_its_sequences_and_gets_no_new_ones(monkeypatch) -> None:
    stopping, staying = DrainingTarget(drain_at_call=2), DrainingTarget()
    fakes = _fixed_pool(monkeypatch, {"a:1": stopping, "b:2": staying})
    model = ToyModel()

    async def scenario() -> tuple[list[LiveRequest], list[LiveRequest], Fleet]:
        fleet = await _fleet_over(fakes, RouterConfig(depth="0", targets="a:1,b:2"))
        fleet.loops["a:1"].capacity = 2  # two run there, one waits for a slot
        held = [live_request(f"s{i}", [i + 1, i + 2], 30) for i in range(3)]
        for seq in held:
            fleet.loops["a:1"].submit(seq)
        await _until(lambda: fleet.targets["a:1"].draining)
        later = [live_request(f"t{i}", [i + 5], 4) for i in range(2)]
        for seq in later:
            fleet.place(seq)
        await _until(lambda: all(s.finished for s in [*held, *later]))
        await _until(lambda: "a:1" not in fleet.loops)  # retired once idle, asked again: still shutting down
        stopping.draining = False  # its successor answers
        await _until(lambda: "a:1" in fleet.loops)
        await fleet.stop()
        return held, later, fleet

    held, later, fleet = asyncio.run(scenario())
    on_a = {ask.delta.seq_id for asks in stopping.asks for ask in asks}
    assert on_a >= {"s0", "s1"} and not on_a & {"s2", "t0", "t1"}  # the waiting one and the new ones went to b
    assert all(s.moves == 0 and s.error is None for s in held)
    assert [s.generated for s in held] == [model.generate([i + 1, i + 2], 30) for i in range(3)]
    assert [s.generated for s in later] == [model.generate([i + 5], 4) for i in range(2)]
