"""Who may call what: API keys on the router's public APIs, a shared token on the internal ones, TLS on the public
ports.

- **API keys.** With keys configured, a client of the router must present one: HTTP as ``Authorization: Bearer
  <key>``, gRPC as the same ``authorization`` metadata. Health checks and reflection stay open (probes and load
  balancers call them without keys).
- **Internal tokens.** Draft and target services configured with tokens answer only callers that send one of them
  (``x-specfleet-token`` metadata); a router sends its one token: a client that reaches a draft or target port
  cannot call ``Propose``, ``Verify`` or ``Release``, nor read ``GetInfo``. Each token is a caller of its own: the
  sequences a call names live in that token's scope (`caller_scope`), so routers with different tokens cannot
  touch each other's sequences even by name.
- **Callers.** A request belongs to the key that started it: only that key, or an admin key, may abort it, and
  only an admin key sees the internal addresses in ``GetServerInfo``. A router without API keys cannot tell callers
  apart, so every caller is its admin.
- **TLS** on the router's public ports (gRPC and HTTP) from a certificate and key in PEM files.

Secrets come from files (a Kubernetes Secret mounted as one) or environment variables, never from a flag's value,
which any user of the machine can read in the process list. Keys are compared in constant time.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

API_KEYS_ENV = "SPECFLEET_API_KEYS"
"""Comma-separated API keys the router accepts, beside those in ``--api-key-file``."""
ADMIN_KEYS_ENV = "SPECFLEET_ADMIN_KEYS"
"""Comma-separated admin keys, beside those in ``--admin-key-file``."""
INTERNAL_TOKEN_ENV = "SPECFLEET_INTERNAL_TOKEN"
"""The router's internal token, or the draft's and target's (one per line), beside ``--internal-token-file``."""
TOKEN_HEADER = "x-specfleet-token"
AUTHORIZATION = "authorization"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""gRPC methods every caller may use: health probes and reflection."""


def read_secrets(path: str, env: str, *, separator: str = "\n") -> frozenset[str]:
    """The secrets in file ``path`` (one per line; blank lines and ``#`` comments skipped) and in the environment
    variable ``env`` (split on ``separator``). Raises ValueError for a file that cannot be read."""
    values: list[str] = []
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as err:
            raise ValueError(f"cannot read {path}: {err.strerror}") from err
        values.extend(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    values.extend(part.strip() for part in os.environ.get(env, "").split(separator) if part.strip())
    return frozenset(values)


def api_keys(path: str) -> frozenset[str]:
    return read_secrets(path, API_KEYS_ENV, separator=",")


def admin_keys(path: str) -> frozenset[str]:
    return read_secrets(path, ADMIN_KEYS_ENV, separator=",")


@dataclass(frozen=True)
class Access:
    """The router's public keys: ``keys`` (any of them may call), of which ``admin`` may also act for others."""

    keys: frozenset[str] = frozenset()
    admin: frozenset[str] = frozenset()

    @classmethod
    def from_files(cls, key_file: str, admin_file: str) -> Access:
        admin = admin_keys(admin_file)
        return cls(api_keys(key_file) | admin, admin)

    @staticmethod
    def caller(key: str) -> str:
        """Who presented ``key``, as requests record their owner: a digest, so the key itself is kept nowhere."""
        return hashlib.sha256(key.encode()).hexdigest()[:32] if key else ""

    def is_admin(self, key: str) -> bool:
        return not self.keys or (bool(key) and matches(key, self.admin))


def internal_token(path: str) -> str:
    """The one internal token a router sends ("" when none is configured); ValueError if the sources give several."""
    tokens = internal_tokens(path)
    if len(tokens) > 1:
        raise ValueError(f"a router's internal token must be one line ({path or INTERNAL_TOKEN_ENV} holds "
                         f"{len(tokens)}); draft and target services take several, one per router")
    return next(iter(tokens), "")


def internal_tokens(path: str) -> frozenset[str]:
    """The internal tokens a draft or target answers (none: it answers anyone), each one caller's."""
    return read_secrets(path, INTERNAL_TOKEN_ENV)


def caller_scope(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The prefix of the sequences of the caller whose call carries ``metadata``, on a draft or target: a digest of
    the internal token it presented, so one router's sequences are out of another's reach whatever their names.
    Without a token every caller shares one scope (""); a token that is not accepted never gets this far."""
    token = next((value for key, value in metadata or () if key == TOKEN_HEADER), "")
    return _scope_of(token if isinstance(token, str) else token.decode(errors="replace"))


def unscoped(text: str, scope: str) -> str:
    """``text`` (an error naming sequences) with their names as the caller knows them."""
    return text.replace(scope, "") if scope else text


@functools.lru_cache(maxsize=64)
def _scope_of(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16] + "/" if token else ""


def matches(presented: str, accepted: Iterable[str]) -> bool:
    """Whether ``presented`` is one of ``accepted``, comparing every candidate in constant time."""
    found = False
    for secret in accepted:
        found |= hmac.compare_digest(presented.encode(), secret.encode())
    return found


def bearer(header: str | None) -> str:
    """The key in an ``Authorization: Bearer <key>`` header ("" for none)."""
    scheme, _, key = (header or "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


class RequireSecret(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call but health and reflection whose metadata ``header`` does not hold
    one of ``accepted`` (with ``bearer_scheme``, as ``Bearer <secret>``)."""

    def __init__(self, header: str, accepted: frozenset[str], what: str, bearer_scheme: bool = False) -> None:
        if not accepted:
            raise ValueError("RequireSecret needs at least one accepted secret")
        self.header, self.accepted, self.what, self.bearer_scheme = header, accepted, what, bearer_scheme

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        value = dict(handler_call_details.invocation_metadata or ()).get(self.header, "")
        presented = bearer(value) if self.bearer_scheme else value
        if presented and matches(presented, self.accepted):
            return handler
        message = f"{self.what} is {'wrong' if presented else 'missing'}"
        return _refusal(handler, message)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that ends every call with UNAUTHENTICATED."""
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached: makes this an async generator, as a streaming handler must be

    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codec)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **codec)
    return grpc.unary_unary_rpc_method_handler(refuse, **codec)


def internal_guard(token_file: str) -> list[grpc.aio.ServerInterceptor]:
    """What a draft or target server puts first among its interceptors: the internal tokens' check, if it has any."""
    tokens = internal_tokens(token_file)
    return [RequireSecret(TOKEN_HEADER, tokens, "the internal token")] if tokens else []


def api_key_guard(access: Access) -> list[grpc.aio.ServerInterceptor]:
    """The router's public gRPC server's check of API keys, if any are configured."""
    return [RequireSecret(AUTHORIZATION, access.keys, "the API key", bearer_scheme=True)] if access.keys else []


def server_credentials(cert: str, key: str) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (None when neither is given); ValueError naming what is wrong."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    try:
        return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
    except OSError as err:
        raise ValueError(f"cannot read {err.filename}: {err.strerror}") from err


class SendToken(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the internal token to every call the router makes to a draft or target service."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self.token), request)


class SendTokenOnStreams(grpc.aio.StreamStreamClientInterceptor):
    """`SendToken` for the long-lived calls that carry a step's requests (grpc.aio takes an interceptor for one kind
    of call only)."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, self.token), request_iterator)


def _with_token(client_call_details, token: str):
    metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), (TOKEN_HEADER, token))
    return client_call_details._replace(metadata=metadata)


def token_senders(token_file: str) -> list[grpc.aio.ClientInterceptor]:
    """The router's client interceptors for the internal token, if it has one."""
    token = internal_token(token_file)
    return sending(token) if token else []


def sending(token: str) -> list[grpc.aio.ClientInterceptor]:
    """The client interceptors that put ``token`` on every call, streams included."""
    return [SendToken(token), SendTokenOnStreams(token)]
