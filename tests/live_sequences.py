"""How many sequences a draft or target service holds in its cache: what a released request must bring to 0."""

from __future__ import annotations

import time

import grpc

from specfleet.protos import session_pb2


def live_sequences(address: str, stub_cls) -> int:
    with grpc.insecure_channel(address) as channel:
        return stub_cls(channel).GetInfo(session_pb2.GetServiceInfoRequest(), timeout=10).live_sequences


def wait_live(address: str, stub_cls, expected: int, timeout_s: float = 20) -> int:
    """The service's live count once it reaches ``expected``, or whatever it is after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (live := live_sequences(address, stub_cls)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return live
