"""What the three gRPC servers share: start-up with health, reflection and OpenTelemetry, and a clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specfleet.protos import session_pb2
from specfleet.security import caller_scope, unscoped
from specfleet.undecodable import RefuseUndecodable

if TYPE_CHECKING:
    from specfleet.otel import Otel

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a batch of long prompts plus top-K draft distributions
# A draining service whose routers have not called for this long holds only abandoned sequences: a router that
# steps calls every few milliseconds, or within its draft timeout (2 s by default) when a draft is slow.
DRAIN_IDLE_S = 5.0


def model_thread(name: str) -> ThreadPoolExecutor:
    """The one thread a service runs its model on: loading and warming it up, then every pass and release, one after
    another, while the event loop stays free for health checks.

    One thread for all of it, start-up included, because the CPU kernels (torch's and llama.cpp's) parallelise with
    OpenMP, whose GNU runtime keeps a team of worker threads for each thread that starts parallel work and, once its
    teams hold more threads than there are cores, stops spinning between parallel regions: a model warmed up on the
    main thread and then run from another pays a sleep and a wake-up at every region of every pass
    (bench/step_costs.md, 2026-12-06)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


async def release_sequences(executor: Executor, release: Callable[[list[str]], int],
                            request: session_pb2.ReleaseSequencesRequest, context: grpc.aio.ServicerContext
                            ) -> session_pb2.ReleaseSequencesResponse:
    """A service's ``Release``: frees the caller's own ``request.seq_ids`` by ``release`` on the model thread
    ``executor``. The release waits for the pass under way there, and is applied even where the caller stops waiting
    (a long prefill can outlast its deadline): cancelled, it would leave the sequences holding their slots until
    evicted."""
    scope = caller_scope(context.invocation_metadata())
    released = await asyncio.shield(asyncio.get_running_loop().run_in_executor(
        executor, release, [scope + s for s in request.seq_ids]))
    return session_pb2.ReleaseSequencesResponse(released=released)


async def answer(request: Request, context: grpc.aio.ServicerContext,
                 handle: Callable[[Request, str], Awaitable[Response]]) -> Response:
    """A unary call of a draft or target: ``handle(request, scope)`` in the caller's scope (`caller_scope`), its
    ValueError the call's INVALID_ARGUMENT, naming the sequences as the caller knows them."""
    return await _answered(request, context, handle, caller_scope(context.invocation_metadata()))


async def answer_each(requests: AsyncIterator[Request], context: grpc.aio.ServicerContext,
                      handle: Callable[[Request, str], Awaitable[Response]]) -> AsyncIterator[Response]:
    """A long-lived call of a draft or target: `answer` for each request of it, in order; a refused request ends the
    call with the unary call's status."""
    scope = caller_scope(context.invocation_metadata())
    async for request in requests:
        yield await _answered(request, context, handle, scope)


async def _answered(request: Request, context: grpc.aio.ServicerContext,
                    handle: Callable[[Request, str], Awaitable[Response]], scope: str) -> Response:
    try:
        return await handle(request, scope)
    except ValueError as err:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, unscoped(str(err), scope))
        raise  # never reached: abort raises


@dataclass
class Sessions:
    """A service that holds sequences for its routers (the target): on the signal ``draining`` turns true (its
    replies tell the routers, which send it no new sequences), and it goes on answering until ``held()`` is 0
    (the routers finished and released them), no router has called for ``DRAIN_IDLE_S`` (they are gone, and their
    sequences with them), or the drain timeout passes."""

    held: Callable[[], int]
    draining: bool = False
    last_call: float = 0.0  # time.monotonic() of the last call that worked on sequences (`touched`)

    def touched(self) -> None:
        self.last_call = time.monotonic()


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def serve(
    name: str,
    host: str,
    port: int,
    register: Callable[[grpc.aio.Server], list[str]],
    *,
    on_start: Callable[[], Awaitable[None]] | None = None,
    on_drain: Callable[[], Awaitable[None]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    otel: Otel | None = None,
    drain_timeout_s: float = 5.0,
    credentials: grpc.ServerCredentials | None = None,
    sessions: Sessions | None = None,
) -> None:
    """Runs a gRPC server until SIGINT/SIGTERM. ``register`` adds the servicers and returns their
    full service names, which are reported SERVING on ``grpc.health.v1`` and listed by reflection.
    With ``credentials`` the port speaks TLS. A unary request that does not parse gets INVALID_ARGUMENT.

    On the signal the server drains: health goes NOT_SERVING at once, new calls are refused (UNAVAILABLE), and calls
    under way, streams included, get ``drain_timeout_s`` to finish, while ``on_drain`` (another server of the same
    process, say) drains beside it. Then ``on_stop`` runs and ``otel``'s exporters are flushed. A service with
    ``sessions`` first keeps taking calls until the sequences it holds are finished, within the same timeout."""
    # Innermost, the undecodable requests' refusal: the interceptors around it see every call as usual.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
                             interceptors=[*interceptors, RefuseUndecodable()])
    services = register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"{name}: cannot listen on {host}:{port}")
    await server.start()
    if on_start is not None:
        await on_start()
    for service in ["", *services]:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s serving on %s:%d%s", name, host, bound, " (TLS)" if credentials else "")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s shutting down: calls under way get up to %.0f s to finish", name, drain_timeout_s)
    await health_servicer.enter_graceful_shutdown()
    started = time.monotonic()
    if sessions is not None:
        await _finish_sessions(name, sessions, drain_timeout_s)
    remaining_s = max(1.0, drain_timeout_s - (time.monotonic() - started))
    await asyncio.gather(server.stop(remaining_s), *([on_drain()] if on_drain is not None else []))
    log.info("%s drained in %.1f s", name, time.monotonic() - started)
    if on_stop is not None:
        await on_stop()
    if otel is not None:
        await asyncio.to_thread(otel.shutdown)


async def _finish_sessions(name: str, sessions: Sessions, timeout_s: float) -> None:
    sessions.draining = True
    held, deadline = sessions.held(), time.monotonic() + timeout_s
    if held:
        log.info("%s finishes the %d sequence(s) it holds before it stops (up to %.0f s)", name, held, timeout_s)
    sessions.touched()  # the idle clock starts at the signal
    while sessions.held() and time.monotonic() < deadline and time.monotonic() - sessions.last_call < DRAIN_IDLE_S:
        await asyncio.sleep(0.1)
    if sessions.held():
        timed_out = time.monotonic() >= deadline
        why = "the drain timeout passed" if timed_out else f"no router called for {DRAIN_IDLE_S:.0f} s"
        log.warning("%s stops with %d sequence(s) unfinished (%s): their routers, if any, move them elsewhere", name,
                    sessions.held(), why)


def servicer_name(service_descriptor_holder, service: str) -> str:
    """Full gRPC name of ``service`` declared in a generated ``*_pb2`` module."""
    return service_descriptor_holder.DESCRIPTOR.services_by_name[service].full_name
