"""The router when replicas leave mid-step: no sequence keeps a draft that has left, and no step fails for it."""

from __future__ import annotations

import asyncio

from router.draft_pool import DraftPool
from router.fleet import Fleet, connect_draft, connect_target, step_loop_for
from router.live_request import LiveRequest
from router.replicas import DraftReplica, ReplicaInfo
from specfleet.config import RouterConfig
from specfleet.otel import RouterMetrics
from specfleet.sampling_params import SamplingParams
from specfleet.speculation import DraftPlan, StepPlan

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
        await fleet._reconcile_drafts(frozenset({"e:2"}))
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
