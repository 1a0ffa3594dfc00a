"""A gRPC server with the router's public API that refuses every ``Generate`` with RESOURCE_EXHAUSTED at once and
answers ``GetServerInfo`` empty: what a burst of calls costs grpc.aio itself, the floor under the router's own
rejections in `bench.chaos`'s overload scenario. It runs in its own process, as the router does.

    python -m bench.refusing_server --port 50099
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

import grpc

from specfleet.protos import generate_pb2, generate_pb2_grpc


class Refusing(generate_pb2_grpc.GenerationServiceServicer):
    async def Generate(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full (a server that refuses all)")

    async def GetServerInfo(self, request: generate_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
                            ) -> generate_pb2.GetServerInfoResponse:
        return generate_pb2.GetServerInfoResponse()


async def serve(port: int) -> None:
    server = grpc.aio.server()
    generate_pb2_grpc.add_GenerationServiceServicer_to_server(Refusing(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    asyncio.run(serve(parser.parse_args(argv).port))


if __name__ == "__main__":
    main()
