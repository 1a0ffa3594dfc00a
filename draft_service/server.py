"""The draft service: a thin gRPC adapter over a ``Drafter`` (ngram, model, llamacpp or sparse_self)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from specfleet.config import DraftConfig
from specfleet.drafters import Drafter, DraftRequest, NgramDrafter
from specfleet.otel import Otel, ServiceMetrics
from specfleet.otel import setup as setup_otel
from specfleet.policy.costs import PREFILL_ROLE
from specfleet.protos import draft_pb2, draft_pb2_grpc, session_pb2
from specfleet.security import internal_guard
from specfleet.serving import answer, answer_each, model_thread, release_sequences, serve, servicer_name
from specfleet.speculation import is_prefill
from specfleet.telemetry import TelemetryWriter, writer_for
from specfleet.wire import (
    delta_fields,
    info_response,
    is_chain,
    sampling_from_proto,
    top_k_to_proto,
    tree_shape_from_proto,
    validate_tokens,
)

log = logging.getLogger("specfleet.draft")


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, config: DraftConfig, drafter: Drafter, *, vocab_size: int = 0, fingerprint: str = "",
                 max_seq_len: int = 0, num_slots: int = 0, telemetry: TelemetryWriter | None = None,
                 otel: Otel | None = None, reused_prompt_tokens: Callable[[], int] = lambda: 0,
                 executor: ThreadPoolExecutor | None = None) -> None:
        """``reused_prompt_tokens``: how many prompt tokens the drafter's cache has started from cached prefixes
        (see `ServiceMetrics`); a drafter without a KV cache reuses none. ``executor``: the model thread the drafter
        was loaded on (`specfleet.serving.model_thread`); a new one when not given."""
        self.config = config
        self.telemetry = telemetry
        self.drafter = drafter
        self.metrics = ServiceMetrics(otel, "draft", lambda: drafter.live_sequences, reused_prompt_tokens)
        self.vocab_size, self.fingerprint = vocab_size, fingerprint
        self.max_seq_len, self.num_slots = max_seq_len, num_slots
        self.on_cpu = drafter.kind in ("ngram", "llamacpp") or config.resolved_device() == "cpu"  # for GetInfo
        self.executor = executor or model_thread("drafter")

    async def Propose(self, request: draft_pb2.ProposeRequest, context: grpc.aio.ServicerContext
                      ) -> draft_pb2.ProposeResponse:
        return await answer(request, context, self._propose)

    async def ProposeStream(self, requests: AsyncIterator[draft_pb2.ProposeRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[draft_pb2.ProposeResponse]:
        async for response in answer_each(requests, context, self._propose):
            yield response

    async def _propose(self, request: draft_pb2.ProposeRequest, scope: str) -> draft_pb2.ProposeResponse:
        """One batch drafted on the model thread; ValueError for an entry the drafter cannot take."""
        requests = [self._request(e, scope) for e in request.entries]
        started = time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(self.executor, self.drafter.propose, requests)
        compute_ms = (time.perf_counter() - started) * 1000
        self.metrics.record_batch(compute_ms / 1000)
        self.metrics.record_prompts(sum(len(r.new_tokens) for r in requests if r.rollback_to == 0))
        prompts = [len(r.new_tokens) for r in requests if is_prefill(r.new_tokens)]
        if self.telemetry is not None and prompts:
            # What computing prompts costs this drafter: the router prices a sequence's catch-up by it.
            self.telemetry.record_latency(len(prompts), sum(prompts) / len(prompts), compute_ms, role=PREFILL_ROLE,
                                          drafter=self.drafter.kind)
        # A call that drafts nothing (a prompt computed beside the target's) is no drafting cost.
        if self.telemetry is not None and any(r.depth for r in requests) and not prompts:
            # The sequences' own lengths, whatever the drafter reads of them: how its cost grows with them (a window
            # + sink draft's does not) is for the cost model to measure, and the router prices at those lengths.
            context = sum(r.position for r in requests) / len(requests)
            self.telemetry.record_latency(len(requests), max(r.depth for r in requests), compute_ms, context=context,
                                          drafter=self.drafter.kind)
        return draft_pb2.ProposeResponse(
            compute_ms=compute_ms,
            proposals=[draft_pb2.Proposal(
                seq_id=r.seq_id.removeprefix(scope),
                status=session_pb2.ENTRY_STATUS_OK if r.known else session_pb2.ENTRY_STATUS_UNKNOWN_SEQUENCE,
                tokens=r.tokens, draft_top_k=top_k_to_proto(r.draft_top_k), cached_len=r.cached_len,
                # A chain-shaped tree is a chain: it travels (and is verified) as one.
                parents=r.parents if r.parents is not None and not is_chain(r.parents) else [])
                for r in results])

    def _request(self, entry: draft_pb2.ProposeEntry, scope: str) -> DraftRequest:
        """The entry as the drafter takes it, its sequence in the caller's ``scope``."""
        seq_id, rollback_to, new_tokens = delta_fields(entry.sequence)
        validate_tokens(new_tokens, self.vocab_size, f"{seq_id}: new_tokens")
        tree, max_nodes = tree_shape_from_proto(entry.tree, entry.depth) if entry.HasField("tree") else (None, 0)
        if tree is not None and not new_tokens:
            raise ValueError(f"{seq_id}: a tree request needs at least one new committed token")
        return DraftRequest(scope + seq_id, rollback_to, new_tokens, entry.depth, sampling_from_proto(entry.sampling),
                            entry.seed, tree, max_nodes)

    async def Release(self, request: session_pb2.ReleaseSequencesRequest, context: grpc.aio.ServicerContext
                      ) -> session_pb2.ReleaseSequencesResponse:
        return await release_sequences(self.executor, self.drafter.release, request, context)

    async def GetInfo(self, request: session_pb2.GetServiceInfoRequest, context: grpc.aio.ServicerContext
                      ) -> session_pb2.GetServiceInfoResponse:
        # An ngram drafter runs no model: its --model is an unused default, not worth reporting.
        return info_response(model=self.config.model if self.drafter.kind != "ngram" else "", kind=self.drafter.kind,
                             vocab_size=self.vocab_size, fingerprint=self.fingerprint,
                             max_seq_len=self.max_seq_len, num_slots=self.num_slots,
                             live=self.drafter.live_sequences,
                             on_cpu=self.on_cpu)


def build_servicer(config: DraftConfig, otel: Otel | None = None) -> DraftServicer:
    """The draft service's servicer, its drafter loaded and warmed up on the thread every pass of it will run on."""
    telemetry = writer_for(config.redis_url, "draft", config.port, config.telemetry_prefix)
    executor = model_thread("drafter")
    if config.drafter == "ngram":
        log.info("ngram drafter (prompt lookup, suffixes of %d..%d tokens)", config.ngram_min, config.ngram_max)
        return DraftServicer(config, NgramDrafter(max_ngram=config.ngram_max, min_ngram=config.ngram_min),
                             telemetry=telemetry, otel=otel, executor=executor)
    build = _build_llamacpp if config.drafter == "llamacpp" else _build_model
    return executor.submit(build, config, telemetry, otel, executor).result()


def _build_model(config: DraftConfig, telemetry: TelemetryWriter | None, otel: Otel | None,
                 executor: ThreadPoolExecutor) -> DraftServicer:
    """A model or sparse_self drafter on specfleet's engine."""
    from specfleet.drafters.model import ModelDrafter
    from specfleet.drafters.sparse_self import SparseSelfDrafter
    from specfleet.engine import ModelRunner
    from specfleet.engine.runner import set_cpu_threads
    from specfleet.engine.streaming import StreamingRunner, StreamingWindow
    from specfleet.models import load_tokenizer, resolve_model, tokenizer_fingerprint

    folder = resolve_model(config.model)
    device = config.resolved_device()
    set_cpu_threads(config.threads)
    engine = dict(num_slots=config.num_slots, max_seq_len=config.max_seq_len, device=device, dtype=config.dtype,
                  prepack=config.cpu_prepack == "on")
    drafter: ModelDrafter
    if config.drafter == "sparse_self":
        window = StreamingWindow(sinks=config.sparse_sinks, window=config.sparse_window)
        runner = StreamingRunner.from_folder(folder, window=window, **engine,
                                             prefix_reuse=config.prefix_reuse == "on")
        drafter = SparseSelfDrafter(runner, top_k_pairs=config.top_k_pairs)
        log.info("sparse_self drafter %s loaded on %s: %d slots of up to %d tokens, each attending to %d sink and "
                 "%d recent tokens (%d cache entries a slot), prefix reuse %s", config.model, device,
                 runner.num_slots, runner.max_seq_len, window.sinks, window.window, window.capacity,
                 config.prefix_reuse)
    else:
        runner = ModelRunner.from_folder(folder, **engine, prefix_reuse=config.prefix_reuse == "on")
        drafter = ModelDrafter(runner, top_k_pairs=config.top_k_pairs)
        log.info("model drafter %s loaded on %s: %d slots x %d tokens, prefix reuse %s", config.model, device,
                 runner.num_slots, runner.max_seq_len, config.prefix_reuse)
    runner.warm_up()
    return DraftServicer(config, drafter,
                         vocab_size=runner.vocab_size, fingerprint=tokenizer_fingerprint(load_tokenizer(folder)),
                         max_seq_len=runner.max_seq_len, num_slots=runner.num_slots, telemetry=telemetry, otel=otel,
                         reused_prompt_tokens=lambda: runner.reused_tokens, executor=executor)


def _build_llamacpp(config: DraftConfig, telemetry: TelemetryWriter | None, otel: Otel | None,
                    executor: ThreadPoolExecutor) -> DraftServicer:
    from specfleet.drafters.llamacpp import LlamaCppDrafter
    from specfleet.llamacpp import import_llama_cpp
    from specfleet.models import load_gguf_tokenizer, resolve_gguf, tokenizer_fingerprint

    import_llama_cpp()  # a missing llama-cpp-python fails at once, before a GGUF is fetched
    gguf = resolve_gguf(config.model)
    drafter = LlamaCppDrafter(gguf, num_slots=config.num_slots, max_seq_len=config.max_seq_len,
                              threads=config.threads, top_k_pairs=config.top_k_pairs, tree_slots=config.tree_slots)
    drafter.warm_up()
    # The tokenizer transformers reads from the GGUF, fingerprinted as a model drafter's: the router refuses a
    # target whose tokenizer differs.
    return DraftServicer(config, drafter, vocab_size=drafter.vocab_size,
                         fingerprint=tokenizer_fingerprint(load_gguf_tokenizer(gguf)),
                         max_seq_len=drafter.max_seq_len, num_slots=drafter.num_slots, telemetry=telemetry, otel=otel,
                         executor=executor)


async def run(config: DraftConfig) -> None:
    guard = internal_guard(config.internal_token_file)  # before the model loads: a bad token file fails at once
    otel = setup_otel("draft", config.host, config.metrics_port)
    servicer = build_servicer(config, otel)

    def register(server: grpc.aio.Server) -> list[str]:
        draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server)
        return [servicer_name(draft_pb2, "DraftService")]

    # Only callers with the internal token (if there is one) get in; the router's calls carry its trace context.
    interceptors = [*guard, *otel.server_interceptors()]
    await serve("draft", config.host, config.port, register, interceptors=interceptors, otel=otel,
                drain_timeout_s=config.drain_timeout_s)
