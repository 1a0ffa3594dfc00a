"""What the router's gRPC clients of the draft and target services share: the channel, GetInfo, Release, the
long-lived calls that carry a step's request after request (`CallStream`), and turning gRPC failures into the
router's own errors. Each direction's call lives in its own module
(`router.draft_link`, `router.target_link`); nothing past these modules sees protobuf."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from router.replicas import ReplicaError, ReplicaGone, ReplicaInfo
from specfleet.otel import ClientTracing
from specfleet.protos import session_pb2
from specfleet.serving import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


class GrpcLink:
    """A channel to one replica and the calls every service answers; subclasses add their service's own call."""

    def __init__(self, address: str, stub_class: Callable[[grpc.aio.Channel], object],
                 interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors or None)
        self.stub = stub_class(self.channel)
        self._streams: list[CallStream] = []

    def stream(self, open_call: Callable[[], Any]) -> CallStream:
        """A `CallStream` over this channel, ended when the link closes."""
        self._streams.append(CallStream(open_call))
        return self._streams[-1]

    async def info(self, timeout_s: float) -> ReplicaInfo:
        """GetInfo, waiting for the replica to come up for at most ``timeout_s``; ConnectionError if it does not."""
        try:
            msg = await self.stub.GetInfo(session_pb2.GetServiceInfoRequest(), timeout=timeout_s, wait_for_ready=True)
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise ConnectionError(f"no answer from {self.address} within {timeout_s:.0f} s: {err.details()}"
                                      ) from err
            raise ConnectionError(f"{self.address} refused GetInfo ({err.code().name}): {err.details()}") from err
        return ReplicaInfo(msg.model, msg.kind, msg.vocab_size, msg.tokenizer_fingerprint, msg.max_seq_len,
                           msg.num_slots, msg.live_sequences, tuple(msg.eos_token_ids), msg.draining,
                           msg.max_draft_next, msg.self_drafting, msg.draft_next_width, msg.chains_only, msg.host,
                           tuple(msg.cpus))

    async def release(self, seq_ids: list[str], timeout_s: float = 10.0) -> None:
        """Frees ``seq_ids`` on the replica."""
        await self.call(self.stub.Release, session_pb2.ReleaseSequencesRequest(seq_ids=seq_ids), timeout_s)

    async def exchange(self, stream: CallStream | None, method, request, timeout_s: float):
        """``request`` over ``stream``, or as a call of ``method`` where there is none or the service lacks the
        stream's method (a service from before it: a call per request from then on)."""
        if stream is not None and stream.supported:
            try:
                return await stream.exchange(request, timeout_s)
            except ReplicaError as err:
                if err.code != "UNIMPLEMENTED":
                    raise
                stream.supported = False
        return await self.call(method, request, timeout_s)

    async def call(self, method, request, timeout_s: float):
        """``method(request)``, its failures as `ReplicaError` or `ReplicaGone`."""
        try:
            return await method(request, timeout=timeout_s)
        except (grpc.aio.UsageError, grpc.aio.AioRpcError) as err:
            raise replica_failure(err) from err

    async def close(self, grace_s: float | None = None) -> None:
        for stream in self._streams:
            await stream.close(grace_s)
        await self.channel.close(grace=grace_s)


def replica_failure(err: grpc.aio.UsageError | grpc.aio.AioRpcError) -> ReplicaError | ReplicaGone:
    """A call's gRPC failure as the router's own error."""
    if isinstance(err, grpc.aio.UsageError):  # the channel closed: the replica left the pool
        return ReplicaGone(str(err))
    return ReplicaError(err.code().name, err.details() or "")


def streams_through(interceptors: Sequence[grpc.aio.ClientInterceptor]) -> bool:
    """Whether a step's requests may go over long-lived calls (`CallStream`) through ``interceptors``: not with
    tracing's, whose trace context and span are a call's (with a call per step, every step's span reaches the
    service)."""
    return not any(isinstance(i, ClientTracing) for i in interceptors)


STREAM_IDLE_S = 1.0
"""A call stream unused for this long is ended (the next request opens another): a stepping router sends every few
milliseconds, and an open call would keep a draining service waiting for it until its drain timeout."""


class CallStream:
    """Request after request over one long-lived bidirectional call (``open_call()`` starts it), each answered by
    one response, in order: what a step loop sends every few milliseconds, where a message on an open call costs the
    transport less than a new call. One request at a time; a request that fails, times out or is cancelled ends the
    call (its answer, if any, would be taken for the next one's) and the next request opens another. Failures are
    raised as `ReplicaError` (the call's status; DEADLINE_EXCEEDED past ``timeout_s``) or `ReplicaGone`."""

    def __init__(self, open_call: Callable[[], Any]) -> None:
        self._open_call = open_call
        self.supported = True  # False once the service answered that it has no such method
        self._call: Any = None
        self._lock = asyncio.Lock()
        self._idle: asyncio.TimerHandle | None = None

    async def exchange(self, request: Any, timeout_s: float) -> Any:
        async with self._lock:
            if self._idle is not None:
                self._idle.cancel()
            try:
                if self._call is None:
                    self._call = self._open_call()
                response = await asyncio.wait_for(self._round_trip(self._call, request), timeout_s)
            except BaseException as err:
                self.end()
                if isinstance(err, TimeoutError):
                    raise ReplicaError("DEADLINE_EXCEEDED", f"no answer within {timeout_s:.1f} s") from err
                if isinstance(err, asyncio.InvalidStateError):  # written to a call the service had ended cleanly
                    raise ReplicaError("UNAVAILABLE", "the service ended the call") from err
                if isinstance(err, (grpc.aio.UsageError, grpc.aio.AioRpcError)):
                    raise replica_failure(err) from err
                raise
            self._idle = asyncio.get_running_loop().call_later(STREAM_IDLE_S, self._end_if_idle)
            return response

    @staticmethod
    async def _round_trip(call: Any, request: Any) -> Any:
        await call.write(request)
        response = await call.read()
        if response is grpc.aio.EOF:  # the service ended the call without an error (stopping)
            raise ReplicaError("UNAVAILABLE", "the service ended the call")
        return response

    def end(self) -> None:
        """Ends the call: cancelled on the service too, whose answer to a request under way, if any, is dropped."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def close(self, grace_s: float | None = None) -> None:
        """Ends the call, once the request under way (if any) is answered or ``grace_s`` has passed."""
        if grace_s:
            try:
                await asyncio.wait_for(self._lock.acquire(), grace_s)
            except TimeoutError:
                pass
            else:
                self._lock.release()
        self.end()

    def _end_if_idle(self) -> None:
        if not self._lock.locked():
            self.end()


def delta_to_proto(seq_id: str, rollback_to: int, new_tokens: list[int]) -> session_pb2.SequenceDelta:
    return session_pb2.SequenceDelta(seq_id=seq_id, rollback_to=rollback_to, new_tokens=new_tokens)
