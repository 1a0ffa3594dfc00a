"""A request whose bytes are not the method's message gets INVALID_ARGUMENT, not grpcio's UNKNOWN.

grpc.aio parses a unary request before it calls the method, and answers a parse error with UNKNOWN ("Unexpected
<class 'DecodeError'>"), which reads as a server fault. `RefuseUndecodable` swaps the parser for one that hands
the method an `Undecodable` instead of raising, and the method for one that answers it with INVALID_ARGUMENT
naming the message type. A bidirectional stream's messages are parsed the same way, and the first that does not
parse ends the call so.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class Undecodable:
    """What the lenient parser returns for bytes that are not the message: why not."""

    error: str


def lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as err:  # protobuf's DecodeError, or whatever another parser raises
            return Undecodable(str(err) or type(err).__name__)

    return parse


def message_name(deserializer: Callable[[bytes], Any], method: str) -> str:
    """The full name of the message ``deserializer`` parses (``Message.FromString``), else the method's request."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or f"request of {method}"


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """Answers a request that does not parse (a unary one, or a message of a bidirectional stream) with
    INVALID_ARGUMENT. The innermost interceptor: those around it (the API key's check, tracing) see the call as
    usual."""

    def __init__(self) -> None:
        # Each method's handler and its replacement, made once: a method's handler is the same object every call.
        self._replacements: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        original, replacement = self._replacements.get(method, (None, None))
        if original is not handler:
            replacement = refusing_undecodable(handler, method)
            self._replacements[method] = (handler, replacement)
        return replacement


def refusing_undecodable(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` with the lenient parser, and a method that refuses what it could not parse."""
    behaviour = handler.unary_unary or handler.unary_stream or handler.stream_stream
    if handler.request_deserializer is None or behaviour is None or not (
            inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
        return handler  # client streams, and synchronous methods (none of ours): as grpcio handles them
    message = f"the request is not a valid {message_name(handler.request_deserializer, method)}"
    codec = {"request_deserializer": lenient(handler.request_deserializer),
             "response_serializer": handler.response_serializer}

    async def refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{message}: {request.error}")

    if handler.stream_stream is not None:
        if not inspect.isasyncgenfunction(behaviour):
            return handler

        async def each_refused(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[Any]:
            async def parsed() -> AsyncIterator[Any]:
                async for request in requests:
                    if isinstance(request, Undecodable):
                        await refuse(request, context)
                    yield request

            async with contextlib.aclosing(behaviour(parsed(), context)) as responses:
                async for response in responses:
                    yield response

        return grpc.stream_stream_rpc_method_handler(each_refused, **codec)

    if handler.unary_unary is not None:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await refuse(request, context)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **codec)

    if inspect.isasyncgenfunction(behaviour):
        async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await refuse(request, context)
            # Closed with this call, so that the method's own clean-up runs when the client goes away.
            async with contextlib.aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response

        return grpc.unary_stream_rpc_method_handler(streamed, **codec)

    async def written(request: Any, context: grpc.aio.ServicerContext) -> None:  # streams with context.write
        if isinstance(request, Undecodable):
            await refuse(request, context)
        await behaviour(request, context)

    return grpc.unary_stream_rpc_method_handler(written, **codec)
