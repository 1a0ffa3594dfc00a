"""A release that reaches a busy service waits for the pass under way, and can outlast its caller's deadline (a batch
of long prompts prefills for longer than a release waits). The sequences are freed all the same once the pass ends:
left live, they would hold their slots, and a later request for the same prompt would find it only by copying, or
not at all once those slots were evicted."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_serving import serving

from draft_service.server import DraftServicer
from router.draft_link import GrpcDraftLink
from router.target_link import GrpcTargetLink
from specfleet.config import DraftConfig, TargetConfig
from specfleet.drafters import NgramDrafter
from specfleet.engine import ModelRunner
from specfleet.protos import draft_pb2_grpc, session_pb2, target_pb2_grpc
from specfleet.sampling_params import SamplingParams
from specfleet.speculation import DraftAsk, DraftPlan, SessionDelta, VerifyAsk
from target_service.server import TargetServicer
from target_service.verifier import Verifier

PROMPT = [5, 6, 7, 8, 5, 6, 7, 9, 5, 6, 7]
GREEDY = SamplingParams()


def busy(executor: ThreadPoolExecutor) -> threading.Event:
    """Occupies the service's model thread, as a long pass would, until the returned event is set."""
    done = threading.Event()
    executor.submit(done.wait, 30)
    return done


async def release_times_out(stub: target_pb2_grpc.TargetServiceStub | draft_pb2_grpc.DraftServiceStub) -> None:
    """Releases "s" with a deadline that passes while the model thread is busy."""
    with pytest.raises(grpc.aio.AioRpcError) as timed_out:
        await stub.Release(session_pb2.ReleaseSequencesRequest(seq_ids=["s"]), timeout=0.3)
    assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_targets_release_outlasting_its_deadline_still_frees_the_sequence(tiny_model: Path) -> None:
    runner = ModelRunner.from_folder(tiny_model, num_slots=4, max_seq_len=64, device="cpu")
    servicer = TargetServicer(TargetConfig(), Verifier(runner), fingerprint="", eos_ids=[])

    async def scenario() -> tuple[int, int, int]:
        async with serving(lambda s: target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, s)) as address:
            link = GrpcTargetLink(address, [])
            try:
                await link.verify([VerifyAsk(SessionDelta("s", 0, PROMPT), None, GREEDY, 0)], timeout_s=10)
                before = runner.live_sequences
                free = busy(servicer.executor)
                await release_times_out(target_pb2_grpc.TargetServiceStub(link.channel))
                during = runner.live_sequences
                free.set()
                await asyncio.get_running_loop().run_in_executor(servicer.executor, lambda: None)  # the queue drains
                return before, during, runner.live_sequences
            finally:
                await link.close()

    before, during, after = asyncio.run(scenario())
    assert (before, during, after) == (1, 1, 0)


def test_a_drafts_release_outlasting_its_deadline_still_frees_the_sequence() -> None:
    drafter = NgramDrafter(max_ngram=3, min_ngram=1)
    servicer = DraftServicer(DraftConfig(drafter="ngram"), drafter)

    async def scenario() -> tuple[int, int, int]:
        async with serving(lambda s: draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, s)) as address:
            link = GrpcDraftLink(address, [])
            try:
                await link.propose([DraftAsk(SessionDelta("s", 0, PROMPT), DraftPlan(levels=3), GREEDY, 0)],
                                   timeout_s=10)
                before = drafter.live_sequences
                free = busy(servicer.executor)
                await release_times_out(draft_pb2_grpc.DraftServiceStub(link.channel))
                during = drafter.live_sequences
                free.set()
                await asyncio.get_running_loop().run_in_executor(servicer.executor, lambda: None)
                return before, during, drafter.live_sequences
            finally:
                await link.close()

    before, during, after = asyncio.run(scenario())
    assert (before, during, after) == (1, 1, 0)
