"""The target service: a thin gRPC adapter over ``Verifier`` (the big model verifying drafts)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from specfleet.config import DraftConfig, TargetConfig
from specfleet.engine import ModelRunner
from specfleet.engine.runner import set_cpu_threads
from specfleet.models import eos_token_ids, load_tokenizer, resolve_model, tokenizer_fingerprint
from specfleet.otel import Otel, ServiceMetrics
from specfleet.otel import setup as setup_otel
from specfleet.protos import session_pb2, target_pb2, target_pb2_grpc
from specfleet.security import internal_guard
from specfleet.serving import Sessions, answer, answer_each, model_thread, release_sequences, serve, servicer_name
from specfleet.space_model import space_settings_for
from specfleet.speculation import is_prefill
from specfleet.telemetry import TelemetryWriter, writer_for
from specfleet.wire import (
    delta_fields,
    info_response,
    sampling_from_proto,
    top_k_to_proto,
    validate_parents,
    validate_tokens,
)
from target_service.self_drafting import LookaheadDrafting, PromptLookupDrafting, SpaceDrafting
from target_service.verifier import Verifier, VerifyItem

log = logging.getLogger("specfleet.target")


class TargetServicer(target_pb2_grpc.TargetServiceServicer):
    def __init__(self, config: TargetConfig, verifier: Verifier, fingerprint: str, eos_ids: list[int],
                 telemetry: TelemetryWriter | None = None, otel: Otel | None = None,
                 executor: ThreadPoolExecutor | None = None) -> None:
        """``executor``: the model thread the verifier was loaded on (`specfleet.serving.model_thread`); a new one
        when not given."""
        self.config = config
        self.telemetry = telemetry
        self.verifier = verifier
        self.metrics = ServiceMetrics(otel, "target", lambda: verifier.runner.live_sequences,
                                      lambda: verifier.runner.reused_tokens)
        self.fingerprint = fingerprint
        self.eos_ids = eos_ids
        self.on_cpu = config.backend == "llamacpp" or config.resolved_device() == "cpu"  # for GetInfo
        self.sessions = Sessions(lambda: verifier.runner.live_sequences)
        self.executor = executor or model_thread("target-model")

    async def Verify(self, request: target_pb2.VerifyRequest, context: grpc.aio.ServicerContext
                     ) -> target_pb2.VerifyResponse:
        return await answer(request, context, self._verify)

    async def VerifyStream(self, requests: AsyncIterator[target_pb2.VerifyRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[target_pb2.VerifyResponse]:
        async for response in answer_each(requests, context, self._verify):
            yield response

    async def _verify(self, request: target_pb2.VerifyRequest, scope: str) -> target_pb2.VerifyResponse:
        """One batch verified on the model thread; ValueError for an entry the verifier cannot take."""
        items = [self._item(e, scope) for e in request.entries]
        started = time.perf_counter()
        self.sessions.touched()
        verdicts = await asyncio.get_running_loop().run_in_executor(self.executor, self.verifier.verify, items)
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.metrics.record_batch(elapsed_ms / 1000)
        self.metrics.record_prompts(sum(len(i.new_tokens) for i in items if i.rollback_to == 0))
        if self.telemetry is not None and items and not any(is_prefill(i.new_tokens) for i in items):
            fed = [self.verifier.fed_tokens(i) for i in items]
            tokens_per_seq = sum(fed) / len(items)
            # The KV each sequence's verify reads: its committed tokens, where its drafts start (the router's price).
            context = sum(i.position for i in items) / len(items)
            self.telemetry.record_latency(len(items), tokens_per_seq, elapsed_ms, context=context,
                                          widest=max(fed) if max(fed) > min(fed) else None)
        return target_pb2.VerifyResponse(
            compute_ms=elapsed_ms, draining=self.sessions.draining,
            verdicts=[target_pb2.Verdict(
                seq_id=v.seq_id.removeprefix(scope),
                status=session_pb2.ENTRY_STATUS_OK if v.known else session_pb2.ENTRY_STATUS_UNKNOWN_SEQUENCE,
                accepted=v.accepted, tokens=v.tokens, cached_len=v.cached_len, accepted_nodes=v.accepted_nodes,
                next_draft_tokens=v.next_tokens, next_draft_top_k=top_k_to_proto(v.next_top_k))
                for v in verdicts])

    def _item(self, entry: target_pb2.VerifyEntry, scope: str) -> VerifyItem:
        """The entry as the verifier takes it, its sequence in the caller's ``scope``."""
        seq_id, rollback_to, new_tokens = delta_fields(entry.sequence)
        vocab = self.verifier.runner.vocab_size
        validate_tokens(new_tokens, vocab, f"{seq_id}: new_tokens")
        validate_tokens(entry.draft_tokens, vocab, f"{seq_id}: draft_tokens")
        if not new_tokens:
            raise ValueError(f"{seq_id}: every verify entry needs at least one new token")
        sampling = sampling_from_proto(entry.sampling)
        draft_top_k = None
        if not sampling.greedy and entry.draft_tokens:
            if len(entry.draft_top_k) != len(entry.draft_tokens):
                raise ValueError(f"{seq_id}: {len(entry.draft_tokens)} draft tokens but "
                                 f"{len(entry.draft_top_k)} draft distributions")
            width = max(len(d.token_ids) for d in entry.draft_top_k)
            ids = torch.zeros(len(entry.draft_top_k), width, dtype=torch.long)
            probs = torch.zeros(len(entry.draft_top_k), width)
            for row, dist in enumerate(entry.draft_top_k):
                validate_tokens(dist.token_ids, vocab, f"{seq_id}: draft_top_k")
                ids[row, : len(dist.token_ids)] = torch.tensor(list(dist.token_ids), dtype=torch.long)
                probs[row, : len(dist.probs)] = torch.tensor(list(dist.probs))
            draft_top_k = (ids, probs)
        parents = None
        if entry.draft_parents:
            validate_parents(entry.draft_parents, len(entry.draft_tokens), f"{seq_id}: draft_parents")
            parents = list(entry.draft_parents)
        return VerifyItem(scope + seq_id, rollback_to, new_tokens, list(entry.draft_tokens), draft_top_k, sampling,
                          entry.seed, parents, entry.draft_next)

    async def Release(self, request: session_pb2.ReleaseSequencesRequest, context: grpc.aio.ServicerContext
                      ) -> session_pb2.ReleaseSequencesResponse:
        return await release_sequences(self.executor, self.verifier.release, request, context)

    async def GetInfo(self, request: session_pb2.GetServiceInfoRequest, context: grpc.aio.ServicerContext
                      ) -> session_pb2.GetServiceInfoResponse:
        runner = self.verifier.runner
        return info_response(model=self.config.model, kind="target", vocab_size=runner.vocab_size,
                             fingerprint=self.fingerprint, max_seq_len=runner.max_seq_len,
                             num_slots=runner.num_slots, live=runner.live_sequences, eos_ids=self.eos_ids,
                             draining=self.sessions.draining, max_draft_next=self.verifier.max_draft_next,
                             self_drafting=self.verifier.self_drafting,
                             draft_next_width=self.verifier.drafting.width if self.verifier.drafting else 0,
                             chains_only=not runner.supports_trees,
                             on_cpu=self.on_cpu)



def build_servicer(config: TargetConfig, otel: Otel | None = None) -> TargetServicer:
    """The target's servicer, its model loaded and warmed up on the thread every pass of it will run on."""
    telemetry = writer_for(config.redis_url, "target", config.port, config.telemetry_prefix)
    executor = model_thread("target-model")
    load = _load_llamacpp if config.backend == "llamacpp" else _load_engine
    verifier, fingerprint, eos_ids = executor.submit(load, config).result()
    return TargetServicer(config, verifier, fingerprint, eos_ids, telemetry, otel, executor)


def _load_engine(config: TargetConfig) -> tuple[Verifier, str, list[int]]:
    """The verifier over specfleet's engine, the tokenizer's fingerprint and the model's end-of-sequence tokens."""
    folder = resolve_model(config.model)
    tokenizer = load_tokenizer(folder)
    device = config.resolved_device()
    set_cpu_threads(config.threads)
    runner = ModelRunner.from_folder(folder, num_slots=config.num_slots, max_seq_len=config.max_seq_len,
                                     device=device, dtype=config.dtype, prepack=config.cpu_prepack == "on",
                                     prefix_reuse=config.prefix_reuse == "on")
    runner.warm_up()
    dtype = runner.model.lm_head.weight.dtype
    log.info("target model %s loaded on %s in %s: %d slots x %d tokens, prefix reuse %s", config.model, device,
             str(dtype).removeprefix("torch."), runner.num_slots, runner.max_seq_len, config.prefix_reuse)
    if dtype != torch.float32:
        log.warning("%s weights round a forward differently with the number of tokens it carries, so greedy output "
                    "with drafts can part from one-token-at-a-time decoding where two tokens nearly tie; float32 "
                    "keeps them together (docs/engine.md, \"Half precision\")", str(dtype).removeprefix("torch."))
    space = space_settings_for(folder, config.space_masks, config.space_mask_token, runner.vocab_size)
    lookahead = LookaheadDrafting(config.lookahead_window, config.lookahead_ngram) if config.lookahead_window else None
    for flag, other in (("--lookahead-window", lookahead), ("--prompt-lookup-depth", config.prompt_lookup_depth)):
        if space is not None and other:
            raise ValueError(f"{flag} drafts another way, but this target already drafts with SPACE masks (its model "
                             "folder or --space-masks): choose one (--space-masks 0 turns SPACE off)")
    if space is not None:
        log.info("SPACE self-drafting: up to %d masks per group, mask token %d", space[1], space[0])
    if lookahead is not None:
        log.info("lookahead self-drafting: a Jacobi chain of %d guesses, %d-grams", lookahead.window, lookahead.ngram)
    verifier = Verifier(runner, SpaceDrafting(*space) if space is not None else
                        lookahead or prompt_lookup_for(config, runner.num_slots))
    return verifier, tokenizer_fingerprint(tokenizer), eos_token_ids(folder, tokenizer)


def _load_llamacpp(config: TargetConfig) -> tuple[Verifier, str, list[int]]:
    """A target whose model is a GGUF run by llama.cpp (`specfleet.llamacpp.LlamaCppRunner`): the same Verifier,
    over llama.cpp's logits, for draft chains."""
    from specfleet.llamacpp import LlamaCppRunner, import_llama_cpp
    from specfleet.models import load_gguf_tokenizer, resolve_gguf

    import_llama_cpp("--backend llamacpp")  # a missing llama-cpp-python fails at once, before a GGUF is fetched
    gguf = resolve_gguf(config.model)
    runner = LlamaCppRunner(gguf, num_slots=config.num_slots, max_seq_len=config.max_seq_len,
                            threads=config.threads, batch_invariant=True, needed_by="--backend llamacpp")
    runner.warm_up()
    log.info("target model %s (%s) runs on llama.cpp: %d slots x %d tokens, %d threads", config.model, gguf.name,
             runner.num_slots, runner.max_seq_len, runner.threads)
    # The tokenizer transformers reads from the GGUF, fingerprinted as the engine's: routers and drafts that share
    # the model's tokenizer take it. Sequences end where llama.cpp's own decoding ends them (its end-of-generation
    # tokens), so the output is what llama.cpp alone would give.
    tokenizer = load_gguf_tokenizer(gguf)
    verifier = Verifier(runner, prompt_lookup_for(config, runner.num_slots))
    return verifier, tokenizer_fingerprint(tokenizer), runner.eos_token_ids


def prompt_lookup_for(config: TargetConfig, num_slots: int) -> PromptLookupDrafting | None:
    """Prompt-lookup self-drafting where --prompt-lookup-depth asks for it, with the ngram draft service's default
    suffix lengths; it keeps the text of as many sequences as the cache can hold, twice over."""
    if not config.prompt_lookup_depth:
        return None
    log.info("prompt-lookup self-drafting: up to %d drafts per step, suffixes of %d-%d tokens",
             config.prompt_lookup_depth, DraftConfig.ngram_min, DraftConfig.ngram_max)
    return PromptLookupDrafting(config.prompt_lookup_depth, DraftConfig.ngram_max, DraftConfig.ngram_min,
                                max_sequences=2 * num_slots)



async def run(config: TargetConfig) -> None:
    guard = internal_guard(config.internal_token_file)  # before the model loads: a bad token file fails at once
    otel = setup_otel("target", config.host, config.metrics_port)
    servicer = build_servicer(config, otel)

    def register(server: grpc.aio.Server) -> list[str]:
        target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server)
        return [servicer_name(target_pb2, "TargetService")]

    # Only callers with the internal token (if there is one) get in; the router's calls carry its trace context.
    interceptors = [*guard, *otel.server_interceptors()]
    await serve("target", config.host, config.port, register, interceptors=interceptors, otel=otel,
                drain_timeout_s=config.drain_timeout_s, sessions=servicer.sessions)
