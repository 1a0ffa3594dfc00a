"""Each internal token is a caller of its own: a draft or target that accepts two routers' tokens keeps their
sequences apart, so a router that names another's sequence (by accident, or having learnt the id) neither frees
it, nor overwrites its cache, nor changes what it generates."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import grpc
import pytest
from grpc_serving import serving as serve

from draft_service.server import DraftServicer
from router.draft_link import GrpcDraftLink
from router.target_link import GrpcTargetLink
from specfleet.config import DraftConfig, TargetConfig
from specfleet.drafters import NgramDrafter
from specfleet.engine import ModelRunner
from specfleet.protos import draft_pb2_grpc, session_pb2, target_pb2_grpc
from specfleet.sampling_params import SamplingParams
from specfleet.security import TOKEN_HEADER, caller_scope, internal_guard, sending
from specfleet.speculation import DraftAsk, DraftPlan, SessionDelta, VerifyAsk
from target_service.server import TargetServicer
from target_service.verifier import Verifier

ROUTER, INTRUDER = "token-of-router-a", "token-of-router-b"
PROMPT = [5, 6, 7, 8, 5, 6, 7, 9, 5, 6, 7]  # repeats itself: the ngram drafter has something to propose
OTHER_PROMPT = [40, 41, 42, 43, 44, 45]
GREEDY = SamplingParams()


def serving(token_file: Path, add: Callable[[grpc.aio.Server], None]) -> AbstractAsyncContextManager[str]:
    return serve(add, internal_guard(str(token_file)))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# one token per router\n{ROUTER}\n{INTRUDER}\n")
    return path


def test_a_scope_is_the_presented_tokens_digest() -> None:
    scope = caller_scope(((TOKEN_HEADER, ROUTER), ("other", "x")))
    assert scope == caller_scope([(TOKEN_HEADER, ROUTER.encode())]) != caller_scope([(TOKEN_HEADER, INTRUDER)])
    assert scope.endswith("/") and ROUTER not in scope
    assert caller_scope(None) == caller_scope([("other", "x")]) == ""  # no token: one scope for every caller


def test_another_routers_verify_and_release_leave_a_sequence_as_it_was(token_file: Path, tiny_model: Path) -> None:
    runner = ModelRunner.from_folder(tiny_model, num_slots=4, max_seq_len=64, device="cpu")
    servicer = TargetServicer(TargetConfig(), Verifier(runner), fingerprint="", eos_ids=[])

    def add(server: grpc.aio.Server) -> None:
        target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server)

    def plain(seq_id: str, rollback_to: int, new_tokens: list[int]) -> VerifyAsk:
        return VerifyAsk(SessionDelta(seq_id, rollback_to, new_tokens), None, GREEDY, 0)

    async def scenario() -> tuple[list[int], list[int], list[str], int, int]:
        async with serving(token_file, add) as address:
            link = GrpcTargetLink(address, sending(ROUTER))
            intruder = GrpcTargetLink(address, sending(INTRUDER))
            intruder_stub = target_pb2_grpc.TargetServiceStub(intruder.channel)
            try:
                outputs: dict[str, list[int]] = {"s": [], "control": []}
                for seq_id in outputs:  # both sequences take their first token
                    reply = await link.verify([plain(seq_id, 0, PROMPT)], timeout_s=10)
                    outputs[seq_id].extend(reply.answers[seq_id].tokens)
                # The intruder names "s": frees nothing, and its own "s" is another sequence.
                released = (await intruder_stub.Release(session_pb2.ReleaseSequencesRequest(seq_ids=["s"]),
                                                        timeout=10)).released
                await intruder.verify([plain("s", 0, OTHER_PROMPT)], timeout_s=10)
                unknown = (await intruder.verify([plain("control", 3, [1])], timeout_s=10)).unknown
                for _ in range(6):  # both go on, one token a step
                    for seq_id, tokens in outputs.items():
                        reply = await link.verify([plain(seq_id, len(PROMPT) + len(tokens) - 1, tokens[-1:])],
                                                  timeout_s=10)
                        assert not reply.unknown, f"{seq_id} was lost"
                        tokens.extend(reply.answers[seq_id].tokens)
                live = runner.live_sequences
                return outputs["s"], outputs["control"], unknown, released, live
            finally:
                await link.close()
                await intruder.close()

    attacked, control, unknown, released, live = asyncio.run(scenario())
    assert released == 0
    assert unknown == ["control"]  # named as the intruder named it, and not the router's "control"
    assert attacked == control and len(attacked) == 7
    assert live == 3  # the router's two sequences and the intruder's own "s"


def test_another_routers_release_leaves_a_drafts_sequence(token_file: Path) -> None:
    servicer = DraftServicer(DraftConfig(drafter="ngram"), NgramDrafter(max_ngram=3, min_ngram=1))

    def add(server: grpc.aio.Server) -> None:
        draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server)

    def ask(seq_id: str, rollback_to: int, new_tokens: list[int]) -> DraftAsk:
        return DraftAsk(SessionDelta(seq_id, rollback_to, new_tokens), DraftPlan(levels=3), GREEDY, 0)

    async def scenario() -> tuple[dict[str, list[tuple[int, ...]]], int, list[str]]:
        async with serving(token_file, add) as address:
            link = GrpcDraftLink(address, sending(ROUTER))
            intruder = GrpcDraftLink(address, sending(INTRUDER))
            try:
                proposals: dict[str, list[tuple[int, ...]]] = {"s": [], "control": []}
                for seq_id, seen in proposals.items():
                    seen.append((await link.propose([ask(seq_id, 0, PROMPT)], timeout_s=10)).answers[seq_id].tokens)
                released = (await draft_pb2_grpc.DraftServiceStub(intruder.channel).Release(
                    session_pb2.ReleaseSequencesRequest(seq_ids=["s"]), timeout=10)).released
                await intruder.propose([ask("s", 0, OTHER_PROMPT)], timeout_s=10)
                unknown = []
                for seq_id, seen in proposals.items():
                    reply = await link.propose([ask(seq_id, len(PROMPT), [5, 6])], timeout_s=10)
                    unknown += reply.unknown
                    seen.append(reply.answers[seq_id].tokens)
                return proposals, released, unknown
            finally:
                await link.close()
                await intruder.close()

    proposals, released, unknown = asyncio.run(scenario())
    assert released == 0 and unknown == []
    assert proposals["s"] == proposals["control"] and all(proposals["s"])  # as if nobody had named "s"


def test_the_token_of_neither_router_is_refused(token_file: Path) -> None:
    servicer = DraftServicer(DraftConfig(drafter="ngram"), NgramDrafter())

    def add(server: grpc.aio.Server) -> None:
        draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server)

    async def scenario() -> grpc.StatusCode:
        async with serving(token_file, add) as address, grpc.aio.insecure_channel(address) as channel:
            try:
                await draft_pb2_grpc.DraftServiceStub(channel).Release(
                    session_pb2.ReleaseSequencesRequest(seq_ids=["s"]), timeout=10,
                    metadata=((TOKEN_HEADER, "token-of-nobody"),))
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

    assert asyncio.run(scenario()) == grpc.StatusCode.UNAUTHENTICATED
