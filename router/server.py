"""The router's public gRPC service, the edge of `router.admission` (protobuf in and out), and the router's start."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator

import grpc

from router.admission import GenerationRequest, RequestError, Router
from router.discovery import watcher_for
from router.fleet import Fleet
from router.live_request import FinishReason, LiveRequest, StreamChunk, StreamError
from router.openai_api import EmbeddedServer, build_app, start_http
from router.policy_feed import PolicyFeed
from specfleet.config import RouterConfig
from specfleet.otel import Otel, RouterMetrics
from specfleet.otel import setup as setup_otel
from specfleet.policy import DepthPolicy
from specfleet.protos import generate_pb2, generate_pb2_grpc
from specfleet.security import AUTHORIZATION, Access, api_key_guard, bearer, server_credentials, token_senders
from specfleet.serving import serve, servicer_name
from specfleet.stats import SpeculationSummary

log = logging.getLogger("specfleet.router")


class GenerationServicer(generate_pb2_grpc.GenerationServiceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def GenerateStream(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        seq = await self._admit(request, context)
        try:
            while True:
                chunk = await self._next_chunk(seq, context)
                yield response(seq, chunk.token_ids, chunk.text, chunk)
                if chunk.finish_reason is not None:
                    return
        finally:
            self.router.forget(seq, deadline_passed(context))

    async def Generate(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> generate_pb2.GenerateResponse:
        seq = await self._admit(request, context)
        tokens: list[int] = []
        text: list[str] = []
        try:
            while True:
                chunk = await self._next_chunk(seq, context)
                tokens.extend(chunk.token_ids)
                text.append(chunk.text)
                if chunk.finish_reason is not None:
                    return response(seq, tokens, "".join(text), chunk)
        finally:
            self.router.forget(seq, deadline_passed(context))

    async def Abort(self, request: generate_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> generate_pb2.AbortResponse:
        return generate_pb2.AbortResponse(aborted=self.router.abort(request.request_id, presented_key(context)))

    async def GetServerInfo(self, request: generate_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
                            ) -> generate_pb2.GetServerInfoResponse:
        r, fleet = self.router, self.router.fleet
        info = generate_pb2.GetServerInfoResponse(
            model=r.model, draft_kinds=sorted({d.info.kind for d in fleet.drafts if d.info}),
            live_requests=r.live, queued_requests=r.queued,
            max_context=r.max_context, depth=r.config.pinned_depth or 0, depth_setting=r.config.depth,
            max_new_tokens_cap=r.config.max_new_tokens_cap, policy=policy_state(r.feed))
        if r.access.is_admin(presented_key(context)):  # where the internal services are is for admins only
            info.target_addresses.extend(sorted(fleet.loops))
            info.draft_addresses.extend(d.address for d in fleet.drafts)
        return info

    @staticmethod
    async def _next_chunk(seq: LiveRequest, context: grpc.aio.ServicerContext) -> StreamChunk:
        """The request's next stream message; an error ends the call with its status."""
        message = await seq.outbox.get()
        if isinstance(message, StreamError):
            await context.abort(message.code, message.message)
        return message

    async def _admit(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> LiveRequest:
        metadata = context.invocation_metadata()
        try:
            return await self.router.admit(request_from_proto(request), metadata)
        except RequestError as err:
            self.router.metrics.request_rejected(err.code.name, err.message, metadata)
            await context.abort(err.code, err.message)
            raise  # not reached: abort raises


def presented_key(context: grpc.aio.ServicerContext) -> str:
    """The API key the call carries ("" for none); the API key guard has already checked it."""
    return bearer(dict(context.invocation_metadata() or ()).get(AUTHORIZATION))


def request_from_proto(msg: generate_pb2.GenerateRequest) -> GenerationRequest:
    kind, sampling, stopping = msg.WhichOneof("prompt"), msg.sampling, msg.stopping
    return GenerationRequest(
        text=msg.text if kind == "text" else None,
        token_ids=msg.token_ids.ids if kind == "token_ids" else None,  # counted before it is copied
        chat=tuple((m.role, m.content) for m in msg.chat.messages) if kind == "chat" else None,
        request_id=msg.request_id,
        max_new_tokens=stopping.max_new_tokens if stopping.HasField("max_new_tokens") else None,
        temperature=sampling.temperature if sampling.HasField("temperature") else 0.0, top_k=sampling.top_k,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        seed=sampling.seed if sampling.HasField("seed") else None, stop=tuple(stopping.stop),
        ignore_eos=stopping.ignore_eos)


_FINISH_REASONS = {None: generate_pb2.FINISH_REASON_UNSPECIFIED, FinishReason.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
                   FinishReason.EOS: generate_pb2.FINISH_REASON_EOS, FinishReason.STOP: generate_pb2.FINISH_REASON_STOP,
                   FinishReason.ABORTED: generate_pb2.FINISH_REASON_ABORTED}


def response(seq: LiveRequest, token_ids: list[int], text: str, chunk: StreamChunk) -> generate_pb2.GenerateResponse:
    """A stream message (or, with every token and the whole text, the answer of `Generate`) ending at ``chunk``."""
    return generate_pb2.GenerateResponse(
        request_id=seq.request_id, token_ids=token_ids, text=text, finish_reason=_FINISH_REASONS[chunk.finish_reason],
        stats=stats_to_proto(chunk.stats), prompt_tokens=seq.prompt_len)


def policy_state(feed: PolicyFeed) -> generate_pb2.PolicyState:
    policy = feed.policy
    return generate_pb2.PolicyState(
        mode=feed.mode, redis_up=feed.redis_up, refreshes=feed.refreshes, cost_samples=policy.costs.fitted_roles,
        fleet_acceptance=policy.fleet_alpha, fleet_offer_rate=policy.fleet_offer_rate,
        fleet_sequence_steps=feed.fleet_sequence_steps, last_decision=feed.last_decision)


def stats_to_proto(stats: SpeculationSummary) -> generate_pb2.SpeculationStats:
    return generate_pb2.SpeculationStats(
        steps=stats.steps, drafted_tokens=stats.drafted_tokens, accepted_tokens=stats.accepted_tokens,
        acceptance_rate=stats.acceptance_rate, mean_tokens_per_step=stats.mean_tokens_per_step,
        depth=stats.last_drafted, depth_reason=stats.reason)


def deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def build_policy(config: RouterConfig) -> DepthPolicy:
    if config.pinned_depth is not None:
        return DepthPolicy.fixed(config.pinned_depth, drafts_ahead=config.draft_ahead)
    return DepthPolicy(config.max_depth, mode=config.policy_mode, min_goodput=config.min_goodput,
                       min_gain=config.min_draft_gain, drafts_ahead=config.draft_ahead)


async def build_router(config: RouterConfig, connect_timeout_s: float = 300.0, otel: Otel | None = None,
                       access: Access | None = None) -> Router:
    """Connects to the pools (and follows them from then on), loads the tokenizer and builds the router."""
    from specfleet.models import load_tokenizer, resolve_model, tokenizer_fingerprint
    from specfleet.telemetry import TelemetryReader, TelemetryWriter

    otel = otel or Otel()
    router_id = secrets.token_hex(4)
    reader = writer = None
    if config.redis_url:
        reader = TelemetryReader(config.redis_url, prefix=config.telemetry_prefix)
        writer = TelemetryWriter(config.redis_url, role="router", replica=f"router-{router_id}",
                                 prefix=config.telemetry_prefix)
    feed = PolicyFeed(build_policy(config), reader, config.policy_refresh_s, config.policy_mode)
    metrics = RouterMetrics(otel)
    # Trace context goes into the Propose/Verify calls.
    fleet = Fleet(config, feed, writer, metrics, [*token_senders(config.internal_token_file),
                                                   *otel.client_interceptors()])
    drafts = {name: watcher_for(pool) for name, pool in config.draft_pools.items()} if config.speculates else {}
    await fleet.start(watcher_for(config.target_pool), drafts, connect_timeout_s)
    reference = fleet.reference.info
    tokenizer = load_tokenizer(resolve_model(config.tokenizer or reference.model))
    if tokenizer_fingerprint(tokenizer) != reference.tokenizer_fingerprint:
        await fleet.stop()
        raise ValueError("the router's tokenizer differs from the target's: pass --tokenizer with the target's model")
    router = Router(config, fleet, tokenizer, frozenset(reference.eos_token_ids), feed, router_id, metrics, access)
    metrics.serve(config.served_model_name or router.model, queue_depth=lambda: router.queued,
                  live_requests=lambda: router.live, slot_usage=lambda: fleet.slot_usage,
                  redis_up=lambda: feed.redis_up)
    return router


def _describe_pools(config: RouterConfig) -> str:
    if config.self_draft:
        return "the targets themselves (--self-draft)"
    pools = config.draft_pools
    if len(pools) == 1:
        return str(next(iter(pools.values())))
    return f"{len(pools)} pools (" + ", ".join(f"{name}={pool}" for name, pool in pools.items()) + ")"


async def run(config: RouterConfig) -> None:
    # Secrets and certificates first: a file that cannot be read stops the router before it connects to anything.
    access = Access.from_files(config.api_key_file, config.admin_key_file)
    keys, guard = access.keys, api_key_guard(access)
    credentials = server_credentials(config.tls_cert, config.tls_key)
    otel = setup_otel("router", config.host, config.metrics_port)
    router = await build_router(config, otel=otel, access=access)
    feed_task = asyncio.get_running_loop().create_task(router.feed.run())
    how = (f"chosen each step by the {config.policy_mode} policy (up to {config.max_depth})"
           if config.pinned_depth is None else f"pinned at {config.pinned_depth}")
    log.info("speculation depth %s; %d target(s) from %s, %d draft(s) from %s; %s", how, len(router.fleet.loops),
             config.target_pool, len(router.fleet.drafts), _describe_pools(config) if config.speculates else "none",
             f"{len(keys)} API key(s)" if keys else "no API key needed")

    def register(server: grpc.aio.Server) -> list[str]:
        generate_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(router), server)
        return [servicer_name(generate_pb2, "GenerationService")]

    http: list[tuple[EmbeddedServer, asyncio.Task]] = []

    async def start_http_api() -> None:
        if config.http_port:
            app = build_app(router, config.served_model_name or router.model, keys)
            http.append(await start_http(app, config.host, config.http_port, config.tls_cert, config.tls_key,
                                         config.drain_timeout_s))

    async def drain_http_api() -> None:  # beside the gRPC server's drain: the step loops run until both are done
        for server, task in http:
            server.should_exit = True
            await task

    async def stop_loops() -> None:
        feed_task.cancel()
        await router.canary.stop()
        await router.fleet.stop()
        router.close()

    # No tracing interceptor here: each request's span is the router's server span (it continues the caller's trace).
    await serve("router", config.host, config.port, register, on_start=start_http_api, on_drain=drain_http_api,
                on_stop=stop_loops, otel=otel, interceptors=guard, credentials=credentials,
                drain_timeout_s=config.drain_timeout_s)
