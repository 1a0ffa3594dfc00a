"""The OpenAI-compatible HTTP API, served by the router beside its gRPC API (``--http-port``).

``POST /v1/chat/completions`` and ``POST /v1/completions`` (with ``stream: true`` as server-sent events, and
``stream_options.include_usage``), ``GET /v1/models`` and ``GET /health``. A request becomes the same
`GenerationRequest` the gRPC API makes and goes through `Router.admit`: one code path, the same tokens.

Differences from OpenAI's API, each answered plainly: ``top_k`` and ``ignore_eos`` are accepted as extensions;
``n`` > 1, log probabilities, tools and function calls, non-text response formats, penalties and logit bias are
refused with a 400 that names the parameter. Unknown parameters are ignored, as OpenAI's own clients send new
ones. ``temperature`` defaults to 1, as OpenAI's does (the gRPC API defaults to greedy). Each response also
carries the request's speculation stats under ``metrics.speculative_decoding``, in the shape vLLM reports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import grpc
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from router.admission import GenerationRequest, RequestError, Router
from router.live_request import FinishReason, LiveRequest, StreamChunk, StreamError
from specfleet.security import bearer, matches
from specfleet.stats import SpeculationSummary

log = logging.getLogger("specfleet.router")

DISCONNECT_POLL_S = 0.5
"""How often a request that streams nothing checks whether its client is still there: a client gone that long
costs that much wasted generation at most."""
CLIENT_CLOSED_REQUEST = 499  # the status proxies log for a client that hung up before the answer
COMPLETIONS_MAX_TOKENS = 16
"""``max_tokens`` of a completion that does not say: OpenAI's default for ``/v1/completions``."""

# How the router's errors read over HTTP: status and OpenAI error type, by gRPC status code.
_HTTP_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
_FINISH_REASONS = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
                   FinishReason.ABORTED: "abort"}


class ApiError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    @classmethod
    def of(cls, err: RequestError | StreamError) -> ApiError:
        status, type_ = _HTTP_ERRORS.get(err.code, (500, "internal_error"))
        return cls(status, err.message, type_, code=err.code.name.lower())

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="allow")  # unknown parameters are ignored

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension, as in vLLM
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False  # an extension, as in vLLM
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def refusals(self) -> Iterator[tuple[str, str]]:
        """(parameter, why) for each parameter set to what specfleet does not do."""
        if self.n != 1:
            yield "n", "n must be 1: one choice per request is supported"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                yield name, f"{name} is not supported (it would change the target's distribution)"
        if self.logit_bias:
            yield "logit_bias", "logit_bias is not supported"

    def generation(self, max_tokens: int | None, request_id: str, **prompt: Any) -> GenerationRequest:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationRequest(
            request_id=request_id, max_new_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature, top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos,
            **prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, and the like: not used

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ApiError(400, f"content parts of type {part.get('type')!r} are not supported: send text",
                               param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def refusals(self) -> Iterator[tuple[str, str]]:
        yield from super().refusals()
        if self.logprobs or self.top_logprobs:
            yield "logprobs", "logprobs are not supported yet"
        for name in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(self, name):
                yield name, f"{name} is not supported yet: tools and function calls are not implemented"
        if self.response_format and self.response_format.get("type") != "text":
            yield "response_format", "only response_format {\"type\": \"text\"} is supported"


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refusals(self) -> Iterator[tuple[str, str]]:
        yield from super().refusals()
        if self.logprobs is not None:
            yield "logprobs", "logprobs are not supported yet"
        if self.echo:
            yield "echo", "echo is not supported"
        if self.suffix:
            yield "suffix", "suffix is not supported"
        if self.best_of not in (None, 1):
            yield "best_of", "best_of must be 1"

    def prompt_fields(self) -> dict[str, Any]:
        """The one prompt, as text or token ids; a batch of several prompts is refused."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ApiError(400, f"one prompt per request is supported, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        return {"text": prompt} if isinstance(prompt, str) else {"token_ids": tuple(prompt)}


def build_app(router: Router, served_model: str, api_keys: frozenset[str] = frozenset()) -> FastAPI:
    """The HTTP API over ``router``, serving its target's model under the name ``served_model``; with ``api_keys``,
    every route but /health wants one of them as ``Authorization: Bearer <key>``."""

    async def authorized(request: Request) -> None:
        if not api_keys:
            return
        presented = bearer(request.headers.get("authorization"))
        if not presented or not matches(presented, api_keys):
            raise ApiError(401, "the API key is wrong" if presented else
                           "an API key is needed: send Authorization: Bearer <key>", "authentication_error",
                           code="invalid_api_key")

    app = FastAPI(title="specfleet", summary="OpenAI-compatible API of a speculative-decoding router",
                  docs_url=None, redoc_url=None)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return ApiError(400, f"{where}: {first.get('msg', 'invalid request')}" if where else
                        str(first.get("msg", "invalid request")), param=where or None).response()

    @app.get("/health")
    async def health() -> JSONResponse:
        up = bool(router.fleet.loops)
        return JSONResponse({"status": "ok" if up else "no target"}, status_code=200 if up else 503)

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_model, "object": "model", "created": 0,
                                            "owned_by": "specfleet"}]}

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        _check(body, served_model)
        chat = tuple((m.role, m.text()) for m in body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        generation = body.generation(max_tokens, _request_id(request), chat=chat)
        return await _answer(router, request, generation, body, Shape("chat.completion", "chatcmpl", served_model))

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check(body, served_model)
        max_tokens = COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        generation = body.generation(max_tokens, _request_id(request), **body.prompt_fields())
        return await _answer(router, request, generation, body, Shape("text_completion", "cmpl", served_model))

    app.include_router(v1)
    return app


def _check(body: _Sampling, served_model: str) -> None:
    if body.model != served_model:
        raise ApiError(404, f"model {body.model!r} is not served here; this router serves {served_model!r}",
                       param="model", code="model_not_found")
    refusal = next(body.refusals(), None)
    if refusal is not None:
        param, why = refusal
        raise ApiError(400, why, param=param)


def _request_id(request: Request) -> str:
    return request.headers.get("x-request-id") or secrets.token_hex(8)


class Shape:
    """How one endpoint's responses look: OpenAI's object name and id prefix, and the model they name."""

    def __init__(self, kind: Literal["chat.completion", "text_completion"], prefix: str, model: str) -> None:
        self.kind, self.prefix, self.model = kind, prefix, model
        self.created = int(time.time())

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    def envelope(self, seq: LiveRequest, choices: list[dict[str, Any]], chunk: bool = False) -> dict[str, Any]:
        kind = f"{self.kind}.chunk" if chunk and self.chat else self.kind
        return {"id": f"{self.prefix}-{seq.request_id}", "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def choice(self, text: str, finish: str | None, delta: bool = False, role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if delta:
            message: dict[str, Any] = {"role": "assistant", "content": text} if role else (
                {"content": text} if text else {})
            return {"index": 0, "delta": message, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}


async def _answer(router: Router, request: Request, generation: GenerationRequest, body: _Sampling, shape: Shape
                  ) -> Any:
    try:
        seq = await router.admit(generation, list(request.headers.items()))
    except RequestError as err:
        router.metrics.request_rejected(err.code.name, err.message, list(request.headers.items()))
        raise ApiError.of(err) from err
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_events(router, seq, shape, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text, last = [], None
        async for chunk in _chunks(seq, request):
            text.append(chunk.text)
            last = chunk
        if last is None or last.finish_reason is None:  # the client hung up: nobody reads an answer
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        response = shape.envelope(seq, [shape.choice("".join(text), _FINISH_REASONS[last.finish_reason])])
        return {**response, "usage": _usage(seq), "metrics": _metrics(last.stats)}
    finally:
        router.forget(seq)


async def _chunks(seq: LiveRequest, request: Request) -> AsyncIterator[StreamChunk]:
    """The request's messages up to its last; a request whose client hung up ends (cancelled by `Router.forget`)."""
    while True:
        pending = asyncio.ensure_future(seq.outbox.get())
        while not pending.done():
            await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
            if not pending.done() and await request.is_disconnected():
                pending.cancel()
                log.info("request %s: the client hung up", seq.request_id)
                return
        message = pending.result()
        if isinstance(message, StreamError):
            raise ApiError.of(message)
        yield message
        if message.finish_reason is not None:
            return


async def _events(router: Router, seq: LiveRequest, shape: Shape, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer; the client hanging up cancels this, which ends the request."""
    try:
        if shape.chat:
            yield _event(shape.envelope(seq, [shape.choice("", None, delta=True, role=True)], chunk=True))
        while True:
            message = await seq.outbox.get()
            if isinstance(message, StreamError):
                yield _event(ApiError.of(message).body())
                break
            if message.text:
                yield _event(shape.envelope(seq, [shape.choice(message.text, None, delta=True)], chunk=True))
            if message.finish_reason is not None:
                last = shape.envelope(seq, [shape.choice("", _FINISH_REASONS[message.finish_reason], delta=True)],
                                      chunk=True)
                yield _event({**last, "metrics": _metrics(message.stats)})
                if include_usage:
                    yield _event({**shape.envelope(seq, [], chunk=True), "usage": _usage(seq)})
                break
        yield "data: [DONE]\n\n"
    finally:
        router.forget(seq)


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _usage(seq: LiveRequest) -> dict[str, int]:
    completion = len(seq.tokens) - seq.prompt_len
    return {"prompt_tokens": seq.prompt_len, "completion_tokens": completion,
            "total_tokens": seq.prompt_len + completion}


def _metrics(stats: SpeculationSummary) -> dict[str, Any]:
    """The request's speculation, as vLLM reports it per request, with the router's depth and its reason."""
    return {"speculative_decoding": {
        "num_spec_steps": stats.steps, "num_draft_tokens": stats.drafted_tokens,
        "num_accepted_draft_tokens": stats.accepted_tokens, "draft_acceptance_rate": stats.acceptance_rate,
        # Tokens per step: the accepted drafts plus the target's own token.
        "mean_acceptance_length": stats.mean_tokens_per_step, "depth": stats.last_drafted,
        "depth_reason": stats.reason}}


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside the router's event loop: the router, not uvicorn, handles SIGINT and SIGTERM."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn >= 0.29
        yield


async def start_http(app: FastAPI, host: str, port: int, tls_cert: str = "", tls_key: str = "",
                     drain_timeout_s: float = 60.0) -> tuple[EmbeddedServer, asyncio.Task]:
    """Serves ``app`` on ``host:port`` in this event loop (over TLS with a certificate and key); OSError if it cannot
    listen there. Told to exit, it stops accepting connections and gives responses under way ``drain_timeout_s`` to
    finish."""
    server = EmbeddedServer(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                           access_log=False, ssl_certfile=tls_cert or None,
                                           ssl_keyfile=tls_key or None,
                                           timeout_graceful_shutdown=max(1, round(drain_timeout_s))))
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if task.done():
            raise OSError(f"the OpenAI API cannot listen on {host}:{port}")
        await asyncio.sleep(0.02)
    log.info("OpenAI-compatible API on %s://%s:%d/v1", "https" if tls_cert else "http", host, port)
    return server, task
