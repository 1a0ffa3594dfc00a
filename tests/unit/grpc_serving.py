"""A real gRPC server on a free local port for the duration of a test, with the servicers ``add`` puts on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import grpc


@asynccontextmanager
async def serving(add: Callable[[grpc.aio.Server], None],
                  interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> AsyncIterator[str]:
    server = grpc.aio.server(interceptors=list(interceptors))
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
