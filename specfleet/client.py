"""A small client for the router: ``specfleet generate`` and the tests use it."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import grpc

from specfleet.protos import generate_pb2, generate_pb2_grpc


def make_request(prompt: str | list[int] | None = None, *, chat: list[dict[str, str]] | None = None,
                 request_id: str = "", max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int = 0, seed: int | None = None, stop: list[str] = (),
                 ignore_eos: bool = False) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(request_id=request_id)
    if chat is not None:
        request.chat.messages.extend(generate_pb2.ChatMessage(**m) for m in chat)
    elif isinstance(prompt, str):
        request.text = prompt
    elif prompt is not None:
        request.token_ids.ids.extend(prompt)
    if temperature is not None:
        request.sampling.temperature = temperature
    if top_p is not None:
        request.sampling.top_p = top_p
    request.sampling.top_k = top_k
    if seed is not None:
        request.sampling.seed = seed
    if max_new_tokens is not None:
        request.stopping.max_new_tokens = max_new_tokens
    request.stopping.stop.extend(stop)
    request.stopping.ignore_eos = ignore_eos
    return request


API_KEY_ENV = "SPECFLEET_API_KEY"
"""The API key `specfleet generate` sends, when the router wants one."""


def channel(address: str, tls_ca: str = "") -> grpc.Channel:
    """A channel to a router; over TLS, trusting the PEM certificate(s) in ``tls_ca``, when it is given."""
    if not tls_ca:
        return grpc.insecure_channel(address)
    with open(tls_ca, "rb") as pem:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=pem.read()))


def server_info(address: str, timeout_s: float = 10.0, *, tls_ca: str = "") -> generate_pb2.GetServerInfoResponse:
    """The router's GetServerInfo: its model, limits, draft kinds, policy state (and, for admins, addresses)."""
    with channel(address, tls_ca) as open_channel:
        return generate_pb2_grpc.GenerationServiceStub(open_channel).GetServerInfo(generate_pb2.GetServerInfoRequest(),
                                                                                   timeout=timeout_s)


def stream(address: str, request: generate_pb2.GenerateRequest, timeout_s: float | None = None, *, api_key: str = "",
           tls_ca: str = "") -> Iterator[generate_pb2.GenerateResponse]:
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    with channel(address, tls_ca) as open_channel:
        yield from generate_pb2_grpc.GenerationServiceStub(open_channel).GenerateStream(request, timeout=timeout_s,
                                                                                         metadata=metadata)


FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in generate_pb2.FinishReason.items()}


def print_stream(address: str, request: generate_pb2.GenerateRequest, out=sys.stdout, *, api_key: str = "",
                 tls_ca: str = "") -> generate_pb2.GenerateResponse:
    """Streams an answer to ``out`` and ends with a line of speculation stats; returns the last message."""
    last = None
    count = 0
    for message in stream(address, request, api_key=api_key, tls_ca=tls_ca):
        out.write(message.text)
        out.flush()
        count += len(message.token_ids)
        last = message
    s = last.stats
    out.write(f"\n\n[{count} tokens, finish: {FINISH_NAMES[last.finish_reason]}; speculation: {s.steps} steps, "
              f"{s.drafted_tokens} drafted, {s.accepted_tokens} accepted (acceptance {s.acceptance_rate:.0%}), "
              f"{s.mean_tokens_per_step:.2f} tokens/step]\n")
    return last
