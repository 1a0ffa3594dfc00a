"""The router's verifies and proposals go over one long-lived call each (`VerifyStream`, `ProposeStream`): the same
answers as a call per request, in order; a refused, late or cancelled request ends the call without its answer ever
being taken for the next request's; a service without the stream gets a call per request; an idle call ends."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_serving import serving

import router.grpc_link as grpc_link
from draft_service.server import DraftServicer
from router.draft_link import GrpcDraftLink
from router.grpc_link import streams_through
from router.replicas import ReplicaError
from router.target_link import GrpcTargetLink
from specfleet.config import DraftConfig, TargetConfig
from specfleet.drafters import NgramDrafter
from specfleet.engine import ModelRunner
from specfleet.otel import ClientTracing
from specfleet.protos import draft_pb2_grpc, target_pb2, target_pb2_grpc
from specfleet.sampling_params import SamplingParams
from specfleet.security import internal_guard, token_senders
from specfleet.speculation import DraftAsk, DraftPlan, SessionDelta, VerifyAsk
from specfleet.undecodable import RefuseUndecodable
from target_service.server import TargetServicer
from target_service.verifier import Verifier

PROMPT = [5, 6, 7, 8, 5, 6, 7, 9, 5, 6, 7]
GREEDY = SamplingParams()


class CountingCalls(grpc.aio.ServerInterceptor):
    """Notes the method of every call the server takes."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation, handler_call_details):
        self.methods.append(handler_call_details.method.rsplit("/", 1)[-1])
        return await continuation(handler_call_details)


def plain(seq_id: str, rollback_to: int, new_tokens: list[int]) -> VerifyAsk:
    return VerifyAsk(SessionDelta(seq_id, rollback_to, new_tokens), None, GREEDY, 0)


def target_servicer(tiny_model: Path) -> TargetServicer:
    runner = ModelRunner.from_folder(tiny_model, num_slots=4, max_seq_len=64, device="cpu")
    return TargetServicer(TargetConfig(), Verifier(runner), fingerprint="", eos_ids=[])


async def decode(link: GrpcTargetLink, seq_id: str, steps: int) -> list[int]:
    tokens = list((await link.verify([plain(seq_id, 0, PROMPT)], timeout_s=10)).answers[seq_id].tokens)
    for _ in range(steps):
        reply = await link.verify([plain(seq_id, len(PROMPT) + len(tokens) - 1, tokens[-1:])], timeout_s=10)
        tokens.extend(reply.answers[seq_id].tokens)
    return tokens


def test_verifies_go_over_one_call_and_answer_as_calls_do(tiny_model: Path) -> None:
    servicer, calls = target_servicer(tiny_model), CountingCalls()

    async def scenario() -> tuple[list[int], list[int]]:
        async with serving(lambda s: target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, s),
                           [calls, RefuseUndecodable()]) as address:
            streamed, per_call = GrpcTargetLink(address), GrpcTargetLink(address)
            per_call.verifies = None
            try:
                return await decode(streamed, "a", 6), await decode(per_call, "b", 6)
            finally:
                await streamed.close()
                await per_call.close()

    streamed, per_call = asyncio.run(scenario())
    assert streamed == per_call and len(streamed) == 7
    assert calls.methods.count("VerifyStream") == 1 and calls.methods.count("Verify") == 7


def test_a_refused_request_ends_the_call_with_its_reason_and_the_next_one_is_answered(tiny_model: Path) -> None:
    servicer, calls = target_servicer(tiny_model), CountingCalls()

    async def scenario() -> tuple[ReplicaError, list[int]]:
        async with serving(lambda s: target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, s),
                           [calls, RefuseUndecodable()]) as address:
            link = GrpcTargetLink(address)
            try:
                with pytest.raises(ReplicaError) as refused:
                    await link.verify([plain("bad", 0, [1, 2, 10_000])], timeout_s=10)
                return refused.value, await decode(link, "a", 2)
            finally:
                await link.close()

    refused, tokens = asyncio.run(scenario())
    assert refused.code == "INVALID_ARGUMENT" and "new_tokens" in refused.details and "10000" in refused.details
    assert len(tokens) == 3
    assert calls.methods.count("VerifyStream") == 2  # the refusal ended the first call


class SlowThenFastTarget(target_pb2_grpc.TargetServiceServicer):
    """Answers each request with its first sequence's id; the one named "slow" after half a second."""

    async def VerifyStream(self, requests, context):
        async for request in requests:
            seq_id = request.entries[0].sequence.seq_id
            if seq_id == "slow":
                await asyncio.sleep(0.5)
            yield target_pb2.VerifyResponse(verdicts=[target_pb2.Verdict(seq_id=seq_id, tokens=[1])])


def test_a_late_answer_is_never_taken_for_the_next_requests() -> None:
    async def scenario() -> tuple[ReplicaError, list[str]]:
        async with serving(lambda s: target_pb2_grpc.add_TargetServiceServicer_to_server(SlowThenFastTarget(), s)
                           ) as address:
            link = GrpcTargetLink(address)
            try:
                with pytest.raises(ReplicaError) as late:
                    await link.verify([plain("slow", 0, [1])], timeout_s=0.1)
                answered = []
                for seq_id in ("next", "after"):
                    answered += list((await link.verify([plain(seq_id, 0, [1])], timeout_s=2)).answers)
                await asyncio.sleep(0.6)  # the slow answer is due by now, on the call that was ended
                answered += list((await link.verify([plain("last", 0, [1])], timeout_s=2)).answers)
                return late.value, answered
            finally:
                await link.close()

    late, answered = asyncio.run(scenario())
    assert late.code == "DEADLINE_EXCEEDED"
    assert answered == ["next", "after", "last"]


class UnaryOnlyTarget(target_pb2_grpc.TargetServiceServicer):
    """A target from before VerifyStream: Verify alone."""

    async def Verify(self, request, context):
        return target_pb2.VerifyResponse(verdicts=[target_pb2.Verdict(seq_id=e.sequence.seq_id, tokens=[3])
                                                   for e in request.entries])


def test_a_target_without_the_stream_gets_a_call_per_verify() -> None:
    calls = CountingCalls()

    async def scenario() -> list[tuple[int, ...]]:
        async with serving(lambda s: target_pb2_grpc.add_TargetServiceServicer_to_server(UnaryOnlyTarget(), s),
                           [calls]) as address:
            link = GrpcTargetLink(address)
            try:
                return [(await link.verify([plain(f"s{n}", 0, [1])], timeout_s=5)).answers[f"s{n}"].tokens
                        for n in range(3)]
            finally:
                await link.close()

    assert asyncio.run(scenario()) == [(3,)] * 3
    assert calls.methods == ["VerifyStream", "Verify", "Verify", "Verify"]


def test_an_idle_call_ends_and_the_next_request_opens_another(tiny_model: Path, monkeypatch) -> None:
    monkeypatch.setattr(grpc_link, "STREAM_IDLE_S", 0.05)
    servicer, calls = target_servicer(tiny_model), CountingCalls()

    async def scenario() -> list[int]:
        async with serving(lambda s: target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, s),
                           [calls]) as address:
            link = GrpcTargetLink(address)
            try:
                first = list((await link.verify([plain("a", 0, PROMPT)], timeout_s=10)).answers["a"].tokens)
                await asyncio.sleep(0.3)
                assert link.verifies is not None and link.verifies._call is None  # ended while idle
                reply = await link.verify([plain("a", len(PROMPT), first)], timeout_s=10)
                return first + list(reply.answers["a"].tokens)
            finally:
                await link.close()

    assert len(asyncio.run(scenario())) == 2
    assert calls.methods.count("VerifyStream") == 2


def test_bytes_that_are_not_a_request_end_the_stream_with_invalid_argument(tiny_model: Path) -> None:
    servicer = target_servicer(tiny_model)

    async def scenario() -> grpc.aio.AioRpcError:
        async with serving(lambda s: target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, s),
                           [RefuseUndecodable()]) as address, grpc.aio.insecure_channel(address) as channel:
            raw = channel.stream_stream("/specfleet.v1.TargetService/VerifyStream",
                                        request_serializer=lambda b: b, response_deserializer=lambda b: b)
            call = raw()
            await call.write(b"\xff\xff\xff\xff not a protobuf message")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
            return refused.value

    refused = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid specfleet.v1.VerifyRequest" in refused.details()


def test_proposals_go_over_one_call_with_the_internal_token(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("secret\n")
    servicer, calls = DraftServicer(DraftConfig(), NgramDrafter(), vocab_size=100), CountingCalls()

    async def scenario() -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], str]:
        async with serving(lambda s: draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, s),
                           [*internal_guard(str(tokens)), calls]) as address:
            streamed, per_call = GrpcDraftLink(address, token_senders(str(tokens))), GrpcDraftLink(
                address, token_senders(str(tokens)))
            per_call.proposals = None
            stranger = GrpcDraftLink(address)
            try:
                proposed: dict[str, list[tuple[int, ...]]] = {"a": [], "b": []}
                for n in range(4):
                    for seq_id, link in (("a", streamed), ("b", per_call)):
                        ask = DraftAsk(SessionDelta(seq_id, 0, PROMPT[: 8 + n]), DraftPlan(2), GREEDY, 0)
                        proposed[seq_id].append((await link.propose([ask], timeout_s=5)).answers[seq_id].tokens)
                with pytest.raises(ReplicaError) as refused:
                    await stranger.propose([ask], timeout_s=5)
                return proposed["a"], proposed["b"], refused.value.code
            finally:
                for link in (streamed, per_call, stranger):
                    await link.close()

    streamed, per_call, refused = asyncio.run(scenario())
    assert streamed == per_call and any(streamed)
    assert refused == "UNAUTHENTICATED"
    assert calls.methods.count("Propose") == 4 and calls.methods.count("ProposeStream") == 2  # one the stranger's


def test_tracing_makes_every_request_a_call_of_its_own(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("secret\n")
    assert streams_through(token_senders(str(tokens))) and streams_through([])
    assert not streams_through([*token_senders(str(tokens)), ClientTracing(tracer=None)])
