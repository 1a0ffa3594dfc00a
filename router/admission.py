"""Admission: a request from either public API (gRPC, OpenAI HTTP) becomes a `LiveRequest` on a step loop.

Both APIs turn their messages into one `GenerationRequest` and call `Router.admit`, which validates it (a
`RequestError` with a gRPC status code says what is wrong), tokenises the prompt and places the request on the
least loaded target's loop; `Router.forget` ends it, whoever was reading its stream.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import grpc

from router.canary import Canary
from router.fleet import Fleet
from router.live_request import FinishReason, LiveRequest
from router.policy_feed import PolicyFeed
from router.text import IncrementalDetokenizer, StopMatcher
from specfleet.config import RouterConfig
from specfleet.otel import RouterMetrics
from specfleet.sampling_params import SamplingParams

log = logging.getLogger("specfleet.router")

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the router takes it, whichever API it came through: a prompt as exactly one of ``text``,
    ``token_ids`` or ``chat`` ((role, content) pairs, rendered with the model's chat template), and how to
    generate. ``max_new_tokens`` None takes the router's default; ``seed`` None draws one."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    chat: tuple[tuple[str, str], ...] | None = None
    request_id: str = ""
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Router:
    """Admission and bookkeeping over the fleet's step loops (one per target replica)."""

    def __init__(self, config: RouterConfig, fleet: Fleet, tokenizer: Any, eos_ids: frozenset[int],
                 feed: PolicyFeed, router_id: str, metrics: RouterMetrics | None = None) -> None:
        assert fleet.reference is not None and fleet.reference.info is not None
        self.config = config
        self.feed = feed
        self.metrics = metrics or RouterMetrics()
        self.fleet = fleet
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.model = fleet.reference.info.model
        self.vocab_size = fleet.reference.info.vocab_size
        self.requests: dict[str, LiveRequest] = {}
        self.router_id = router_id  # keeps seq_ids unique when routers share replicas
        self.canary = Canary(config.canary_share, fleet.place, fleet.has_room, tokenizer,
                             lambda matched, replay, at: self.metrics.record_canary(matched, replay.request_id, at))
        self._counter = 0

    @property
    def max_context(self) -> int:
        return self.fleet.max_context

    @property
    def queued(self) -> int:
        return self.fleet.queued

    @property
    def live(self) -> int:
        return self.fleet.live

    def admit(self, request: GenerationRequest, metadata: Any = ()) -> LiveRequest:
        """Validates ``request`` and hands it to the least loaded step loop; raises RequestError. ``metadata`` (the
        call's) may carry the caller's trace context."""
        request_id = request.request_id or secrets.token_hex(8)
        if request_id in self.requests:
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already live")
        prompt = self._prompt_tokens(request)
        if len(prompt) >= self.max_context:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"prompt is {len(prompt)} tokens but the target's context holds {self.max_context} "
                               "(prompt plus at least one new token)")
        max_new = self.config.default_max_new_tokens if request.max_new_tokens is None else request.max_new_tokens
        if not 1 <= max_new <= self.config.max_new_tokens_cap:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"max_new_tokens must be in [1, {self.config.max_new_tokens_cap}], got {max_new}")
        try:
            sampling = SamplingParams(request.temperature, request.top_k, request.top_p)
        except ValueError as err:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        if self.queued >= self.config.max_queue:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self.queued} requests are already waiting (--max-queue {self.config.max_queue})")

        self._counter += 1
        seq = LiveRequest(
            request_id=request_id, seq_id=f"{self.router_id}-{self._counter}", tokens=list(prompt),
            prompt_len=len(prompt), sampling=sampling,
            seed=request.seed if request.seed is not None else secrets.randbits(63),
            max_new_tokens=max_new, eos_ids=self.eos_ids, ignore_eos=request.ignore_eos,
            detokenizer=IncrementalDetokenizer(self.tokenizer), stops=StopMatcher(list(request.stop)),
            draft=self.fleet.pick_draft())
        seq.span = self.metrics.start_request(request_id, len(prompt), metadata)
        self.requests[request_id] = seq
        self.fleet.place(seq)
        return seq

    def forget(self, seq: LiveRequest, deadline_passed: bool = False) -> None:
        """The handler is done with ``seq``: if it is still running, the client went away (or its deadline passed)."""
        outcome, code = seq.outcome(deadline_passed)
        if not seq.finished:
            seq.cancelled = True
            log.info("request %s %s", seq.request_id,
                     "ran past the client's deadline" if deadline_passed else "cancelled by the client")
        self.requests.pop(seq.request_id, None)
        self.canary.consider(seq)
        self.metrics.end_request(seq.span, outcome, code, prompt_tokens=seq.prompt_len,
                                 generated_tokens=len(seq.tokens) - seq.prompt_len,
                                 finish_reason=seq.finish_reason.value if seq.finish_reason else "unspecified",
                                 e2e_s=time.perf_counter() - seq.admitted_at, queue_s=seq.queue_time(),
                                 time_per_output_token_s=seq.time_per_output_token())

    def abort(self, request_id: str) -> bool:
        seq = self.requests.get(request_id)
        if seq is None or seq.finished:
            return False
        seq.finish(FinishReason.ABORTED)
        log.info("request %s aborted", request_id)
        return True

    def _prompt_tokens(self, request: GenerationRequest) -> list[int]:
        given = [kind for kind in ("text", "token_ids", "chat") if getattr(request, kind) is not None]
        if len(given) > 1:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"give one prompt, not {' and '.join(given)}")
        if request.text is not None:
            tokens = self.tokenizer.encode(request.text)
        elif request.token_ids is not None:
            tokens = list(request.token_ids)
            if tokens and (max(tokens) >= self.vocab_size or min(tokens) < 0):
                bad = max(tokens) if max(tokens) >= self.vocab_size else min(tokens)
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"token id {bad} is outside the vocabulary of {self.vocab_size}")
        elif request.chat is not None:
            tokens = self._render_chat(request.chat)
        else:
            tokens = []
        if not tokens:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty: set text, token_ids or chat")
        return tokens

    def _render_chat(self, chat: tuple[tuple[str, str], ...]) -> list[int]:
        messages = [{"role": role, "content": content} for role, content in chat]
        bad = [m["role"] for m in messages if m["role"] not in CHAT_ROLES]
        if bad:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown chat role {bad[0]!r}")
        if not messages:
            return []
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "the model has no chat template: send text")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)


