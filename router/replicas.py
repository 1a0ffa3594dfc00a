"""gRPC clients for the draft and target replicas, with what the router knows about each."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from specfleet.protos import draft_pb2_grpc, session_pb2, target_pb2_grpc
from specfleet.serving import MAX_MESSAGE_BYTES

log = logging.getLogger("specfleet.router")

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


async def fetch_info(stub, address: str, timeout_s: float) -> session_pb2.GetServiceInfoResponse:
    """GetInfo, waiting for the replica to come up for at most ``timeout_s``."""
    try:
        return await stub.GetInfo(session_pb2.GetServiceInfoRequest(), timeout=timeout_s, wait_for_ready=True)
    except grpc.aio.AioRpcError as err:
        raise ConnectionError(f"no answer from {address} within {timeout_s:.0f} s: {err.details()}") from err


@dataclass
class TargetReplica:
    address: str
    channel: grpc.aio.Channel
    stub: target_pb2_grpc.TargetServiceStub
    info: session_pb2.GetServiceInfoResponse | None = None

    @classmethod
    def connect(cls, address: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> TargetReplica:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors or None)
        return cls(address, channel, target_pb2_grpc.TargetServiceStub(channel))


@dataclass
class DraftReplica:
    address: str
    channel: grpc.aio.Channel
    stub: draft_pb2_grpc.DraftServiceStub
    info: session_pb2.GetServiceInfoResponse | None = None
    assigned: int = 0  # live sequences pinned here
    unavailable_until: float = 0.0
    last_error: str = field(default="", repr=False)

    @classmethod
    def connect(cls, address: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> DraftReplica:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors or None)
        return cls(address, channel, draft_pb2_grpc.DraftServiceStub(channel))

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.unavailable_until

    def mark_failed(self, error: str, retry_after_s: float) -> None:
        if self.available:
            log.warning("draft %s failed (%s): its sequences run at depth 0 for %.1f s", self.address, error,
                        retry_after_s)
        self.unavailable_until = time.monotonic() + retry_after_s
        self.last_error = error

    def mark_ok(self) -> None:
        if self.last_error:
            log.info("draft %s is answering again", self.address)
            self.last_error = ""


def check_compatible(targets: list[TargetReplica], drafts: list[DraftReplica]) -> None:
    """Every replica must share the first target's tokenizer; raises ValueError saying which does not."""
    reference = targets[0]
    for replica in [*targets[1:], *drafts]:
        info = replica.info
        if not info.tokenizer_fingerprint:  # a model-free drafter works with any tokenizer
            continue
        if info.tokenizer_fingerprint != reference.info.tokenizer_fingerprint or (
                info.vocab_size != reference.info.vocab_size):
            raise ValueError(
                f"{info.kind} at {replica.address} ({info.model}, vocabulary {info.vocab_size}) does not share the "
                f"tokenizer of the target at {reference.address} ({reference.info.model}, vocabulary "
                f"{reference.info.vocab_size}): every draft and target must use one tokenizer")
