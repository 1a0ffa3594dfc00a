"""A streaming request on a thread, as the end-to-end tests run several at once against a router."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from specfleet.client import stream
from specfleet.protos import generate_pb2


class Streaming:
    """One streaming request on ``pool``: its tokens so far, whether its first message has come (``started``), and
    its whole answer (``future.result()``)."""

    def __init__(self, pool: ThreadPoolExecutor, router: str, request: generate_pb2.GenerateRequest) -> None:
        self.started = threading.Event()
        self.tokens: list[int] = []
        self.future = pool.submit(self._run, router, request)

    def _run(self, router: str, request: generate_pb2.GenerateRequest) -> list[int]:
        for message in stream(router, request, timeout_s=300):
            self.tokens.extend(message.token_ids)
            self.started.set()
        return self.tokens
