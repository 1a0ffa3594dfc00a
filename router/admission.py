"""Admission: a request from either public API (gRPC, OpenAI HTTP) becomes a `LiveRequest` on a step loop.

Both APIs turn their messages into one `GenerationRequest` and call `Router.admit`, which validates it (a
`RequestError` with a gRPC status code says what is wrong), tokenises the prompt and places the request on the
least loaded target's loop; `Router.forget` ends it, whoever was reading its stream.

Admission checks everything it can without tokens first, the full queue last among them, all in a few
microseconds on the event loop: a refusal costs next to nothing, and what a request may cost later is bounded
(`--max-prompt-bytes`, `--max-stop-strings`, `--max-stop-length`). Only then is the prompt tokenised, in a worker
thread (`router.tokenizing`), while the event loop keeps every other request streaming.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from router.canary import Canary
from router.fleet import Fleet
from router.live_request import FinishReason, LiveRequest
from router.policy_feed import PolicyFeed
from router.text import IncrementalDetokenizer, StopMatcher
from router.tokenizing import PromptTokenizer
from specfleet.config import RouterConfig
from specfleet.otel import RouterMetrics
from specfleet.sampling_params import SamplingParams
from specfleet.security import AUTHORIZATION, Access, bearer

log = logging.getLogger("specfleet.router")

CHAT_ROLES = ("system", "user", "assistant")
MAX_REQUEST_ID = 256  # characters
MAX_TOP_K = (1 << 31) - 1


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the router takes it, whichever API it came through: a prompt as exactly one of ``text``,
    ``token_ids`` (any sequence: the gRPC API passes its message's own, uncopied) or ``chat`` ((role, content)
    pairs, rendered with the model's chat template), and how to generate. ``max_new_tokens`` None takes the router's
    default; ``seed`` None draws one."""

    text: str | None = None
    token_ids: Sequence[int] | None = None
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


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8, without a copy for ASCII text (the usual case)."""
    # surrogatepass: JSON can carry a lone surrogate; it counts as the 3 bytes it would take, and fails later.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class Router:
    """Admission and bookkeeping over the fleet's step loops (one per target replica)."""

    def __init__(self, config: RouterConfig, fleet: Fleet, tokenizer: Any, eos_ids: frozenset[int],
                 feed: PolicyFeed, router_id: str, metrics: RouterMetrics | None = None,
                 access: Access | None = None) -> None:
        assert fleet.reference is not None and fleet.reference.info is not None
        self.config = config
        self.feed = feed
        self.metrics = metrics or RouterMetrics()
        self.fleet = fleet
        self.tokenizer = tokenizer
        self.prompts = PromptTokenizer(tokenizer)
        self.eos_ids = eos_ids
        self.model = fleet.reference.info.model
        self.vocab_size = fleet.reference.info.vocab_size
        self.requests: dict[str, LiveRequest] = {}
        # Requests admitted but still tokenising, by request_id: they hold their id and their place in the queue.
        self.tokenizing: set[str] = set()
        self.router_id = router_id  # keeps seq_ids unique when routers share replicas
        self.access = access or Access()
        self.canary = Canary(config.canary_share, fleet.place, fleet.has_room, tokenizer,
                             lambda matched, replay, at: self.metrics.record_canary(matched, replay.request_id, at))

    @property
    def max_context(self) -> int:
        return self.fleet.max_context

    @property
    def queued(self) -> int:
        """Requests waiting: for a slot on a step loop, or for their prompt's tokens."""
        return self.fleet.queued + len(self.tokenizing)

    @property
    def live(self) -> int:
        return self.fleet.live

    async def admit(self, request: GenerationRequest, metadata: Any = ()) -> LiveRequest:
        """Validates ``request``, tokenises its prompt and hands it to the least loaded step loop; raises
        RequestError. ``metadata`` (the call's) may carry the caller's trace context."""
        arrived = time.perf_counter()
        request_id = request.request_id or secrets.token_hex(8)
        if len(request_id) > MAX_REQUEST_ID:  # quoted in errors, whose metadata clients cap at a few KiB
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"request_id is {len(request_id)} characters; at most {MAX_REQUEST_ID}")
        if request_id in self.requests or request_id in self.tokenizing:
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already live")
        prompt_size = self._check_prompt(request)
        self._check_stops(request.stop)
        max_new = self.config.default_max_new_tokens if request.max_new_tokens is None else request.max_new_tokens
        if not 1 <= max_new <= self.config.max_new_tokens_cap:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"max_new_tokens must be in [1, {self.config.max_new_tokens_cap}], got {max_new}")
        try:
            sampling = SamplingParams(request.temperature, request.top_k, request.top_p)
        except ValueError as err:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        # The wire to the target carries top_k as int32 and the seed as uint64: a value past them (the HTTP API's
        # JSON integers have no bound) would fail the whole step of every request batched with it.
        if sampling.top_k > MAX_TOP_K:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"top_k must be at most {MAX_TOP_K}, got "
                                                                 f"{sampling.top_k}")
        if request.seed is not None and not 0 <= request.seed < 1 << 64:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"seed must be in [0, 2^64), got {request.seed}")
        if self.queued >= self.config.max_queue:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self.queued} requests are already waiting (--max-queue {self.config.max_queue})")

        self.tokenizing.add(request_id)
        try:
            prompt = await self._prompt_tokens(request, prompt_size)
        finally:
            self.tokenizing.discard(request_id)
        if not prompt:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty: set text, token_ids or chat")
        self._check_context(len(prompt))

        # A seq_id names the sequence on draft and target services shared with other routers: unguessable, so no
        # other caller can name it there.
        seq = LiveRequest(
            request_id=request_id, seq_id=f"{self.router_id}-{secrets.token_hex(12)}", tokens=prompt,
            prompt_len=len(prompt), sampling=sampling,
            seed=request.seed if request.seed is not None else secrets.randbits(63),
            max_new_tokens=max_new, eos_ids=self.eos_ids, ignore_eos=request.ignore_eos,
            detokenizer=IncrementalDetokenizer(self.tokenizer), stops=StopMatcher(list(request.stop)),
            sessions=self.fleet.pin_drafts(), strategy=self.fleet.first_pool, admitted_at=arrived,
            owner=Access.caller(bearer(dict(metadata or ()).get(AUTHORIZATION))))
        seq.span = self.metrics.start_request(request_id, len(prompt), metadata)
        self.requests[request_id] = seq
        self.fleet.place(seq)
        return seq

    def close(self) -> None:
        self.prompts.close()

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

    def abort(self, request_id: str, key: str = "") -> bool:
        """Ends ``request_id`` if the caller presenting ``key`` started it or is an admin; False otherwise, as for an
        unknown id (so nobody learns the ids of others' requests)."""
        seq = self.requests.get(request_id)
        if seq is None or seq.finished:
            return False
        if not self.access.is_admin(key) and seq.owner != Access.caller(key):
            log.info("request %s: an Abort from a caller who did not start it was refused", request_id)
            return False
        seq.finish(FinishReason.ABORTED)
        log.info("request %s aborted", request_id)
        return True

    def _check_prompt(self, request: GenerationRequest) -> int:
        """Checks the prompt as far as it can be without tokens; returns its size in bytes (0 for token ids)."""
        given = [kind for kind in ("text", "token_ids", "chat") if getattr(request, kind) is not None]
        if len(given) > 1:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"give one prompt, not {' and '.join(given)}")
        ids = request.token_ids
        if not given or (ids is not None and len(ids) == 0) or request.chat == ():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty: set text, token_ids or chat")
        if ids is not None:
            self._check_context(len(ids))  # before reading them: their count alone may refuse them
            highest, lowest = max(ids), min(ids)
            if highest >= self.vocab_size or lowest < 0:
                bad = highest if highest >= self.vocab_size else lowest
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"token id {bad} is outside the vocabulary of {self.vocab_size}")
            return 0
        if request.chat is not None:
            bad = [role for role, _ in request.chat if role not in CHAT_ROLES]
            if bad:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown chat role {bad[0]!r}")
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "the model has no chat template: send text")
        texts = [request.text] if request.text is not None else [content for _, content in request.chat or ()]
        size = sum(utf8_size(text) for text in texts)
        if size > self.config.max_prompt_bytes:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"prompt is {size} bytes; at most {self.config.max_prompt_bytes} are accepted "
                               "(--max-prompt-bytes)")
        return size

    def _check_stops(self, stops: Sequence[str]) -> None:
        if len(stops) > self.config.max_stop_strings:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{len(stops)} stop strings given; at most {self.config.max_stop_strings} are "
                               "accepted (--max-stop-strings)")
        longest = max(stops, key=len, default="")
        if len(longest) > self.config.max_stop_length:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"a stop string is {len(longest)} characters; at most {self.config.max_stop_length} "
                               "are accepted (--max-stop-length)")

    def _check_context(self, prompt_tokens: int) -> None:
        if prompt_tokens >= self.max_context:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"prompt is {prompt_tokens} tokens but the target's context holds {self.max_context} "
                               "(prompt plus at least one new token)")

    async def _prompt_tokens(self, request: GenerationRequest, size: int) -> list[int]:
        if request.token_ids is not None:
            return list(request.token_ids)
        if request.chat is not None:
            messages = [{"role": role, "content": content} for role, content in request.chat]
            return await self.prompts.encode_chat(messages, size)
        assert request.text is not None
        return await self.prompts.encode(request.text, size)
