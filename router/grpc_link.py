"""What the router's gRPC clients of the draft and target services share: the channel, GetInfo, Release, and
turning gRPC failures into the router's own errors. Each direction's call lives in its own module
(`router.draft_link`, `router.target_link`); nothing past these modules sees protobuf."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc

from router.replicas import ReplicaError, ReplicaGone, ReplicaInfo
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

    async def call(self, method, request, timeout_s: float):
        """``method(request)``, its failures as `ReplicaError` or `ReplicaGone`."""
        try:
            return await method(request, timeout=timeout_s)
        except grpc.aio.UsageError as err:  # the channel closed: the replica left the pool
            raise ReplicaGone(str(err)) from err
        except grpc.aio.AioRpcError as err:
            raise ReplicaError(err.code().name, err.details() or "") from err

    async def close(self, grace_s: float | None = None) -> None:
        await self.channel.close(grace=grace_s)


def delta_to_proto(seq_id: str, rollback_to: int, new_tokens: list[int]) -> session_pb2.SequenceDelta:
    return session_pb2.SequenceDelta(seq_id=seq_id, rollback_to=rollback_to, new_tokens=new_tokens)
