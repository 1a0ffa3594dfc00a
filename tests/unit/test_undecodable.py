"""Bytes that are not the method's message get INVALID_ARGUMENT naming the message type, on a grpc.aio server in this
process; well-formed calls, streams, health and the API key's check behave as before."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from specfleet.protos import generate_pb2, generate_pb2_grpc
from specfleet.security import RequireSecret
from specfleet.undecodable import RefuseUndecodable

GARBAGE = b"\xff\xff\xff\xff not a protobuf message"
GENERATE = "/specfleet.v1.GenerationService/Generate"
GENERATE_STREAM = "/specfleet.v1.GenerationService/GenerateStream"


class EchoServicer(generate_pb2_grpc.GenerationServiceServicer):
    """Answers with the request's text, three times when streaming; notes when a stream's clean-up ran."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def Generate(self, request, context):
        return generate_pb2.GenerateResponse(request_id=request.request_id, text=request.text)

    async def GenerateStream(self, request, context):
        try:
            for _ in range(3):
                yield generate_pb2.GenerateResponse(request_id=request.request_id, text=request.text)
            await asyncio.sleep(3600)  # a long generation, until the client goes away
        finally:
            self.closed.set()


@contextlib.asynccontextmanager
async def _serving(interceptors: list) -> AsyncIterator[tuple[str, EchoServicer]]:
    server = grpc.aio.server(interceptors=interceptors)
    servicer = EchoServicer()
    generate_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


def _raw(channel: grpc.aio.Channel, method: str, streaming: bool):
    kind = channel.unary_stream if streaming else channel.unary_unary
    return kind(method, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)


async def _status(call) -> tuple[grpc.StatusCode, str]:
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def test_garbage_gets_invalid_argument_and_good_calls_carry_on() -> None:
    async def scenario() -> None:
        async with _serving([RefuseUndecodable()]) as (address, servicer), \
                grpc.aio.insecure_channel(address) as channel:
            for method, streaming in ((GENERATE, False), (GENERATE_STREAM, True)):
                code, details = await _status(_raw(channel, method, streaming)(GARBAGE))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, details
                assert details.startswith("the request is not a valid specfleet.v1.GenerateRequest: ")

            stub = generate_pb2_grpc.GenerationServiceStub(channel)
            request = generate_pb2.GenerateRequest(request_id="r", text="hi")
            assert (await stub.Generate(request)).text == "hi"
            stream = stub.GenerateStream(request)
            assert [(await stream.read()).text for _ in range(3)] == ["hi"] * 3
            stream.cancel()  # the client goes away mid-stream: the method's clean-up runs
            await asyncio.wait_for(servicer.closed.wait(), 5)

            health_stub = health_pb2_grpc.HealthStub(channel)
            assert (await health_stub.Check(health_pb2.HealthCheckRequest())).status == \
                health_pb2.HealthCheckResponse.SERVING
            watch = health_stub.Watch(health_pb2.HealthCheckRequest())  # a stream written with context.write
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            code, _ = await _status(_raw(channel, "/grpc.health.v1.Health/Check", False)(GARBAGE))
            assert code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(scenario())


@pytest.mark.parametrize("streaming", [False, True])
def test_without_the_key_garbage_is_unauthenticated_first(streaming: bool) -> None:
    async def scenario() -> None:
        guard = RequireSecret("authorization", frozenset({"k"}), "the API key", bearer_scheme=True)
        async with _serving([guard, RefuseUndecodable()]) as (address, _), \
                grpc.aio.insecure_channel(address) as channel:
            method = GENERATE_STREAM if streaming else GENERATE
            code, _ = await _status(_raw(channel, method, streaming)(GARBAGE))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _ = await _status(_raw(channel, method, streaming)(GARBAGE, metadata=(("authorization",
                                                                                          "Bearer k"),)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(scenario())
