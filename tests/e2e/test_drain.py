"""A router asked to stop drains: health goes NOT_SERVING, new requests are refused, and every stream under way,
gRPC or HTTP, finishes with all its tokens."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specfleet.client import make_request, stream
from specfleet.launcher import free_port

pytestmark = pytest.mark.real_model

MAX_NEW = 96


def test_sigterm_lets_every_stream_under_way_finish(cluster) -> None:
    http_port = free_port()
    router = cluster.router("draining-router", target="target", draft="ngram", depth="auto",
                            extra=["--http-port", str(http_port), "--drain-timeout-s", "120"])
    process = cluster.process("draining-router")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    started = [threading.Event() for _ in range(8)]
    results: list[object] = [None] * 8

    def grpc_stream(i: int) -> None:
        request = make_request(f"Tell story number {i} about a lighthouse keeper.", max_new_tokens=MAX_NEW,
                               ignore_eos=True)
        try:
            tokens, finish = [], None
            for message in stream(router, request, timeout_s=300):
                tokens.extend(message.token_ids)
                finish = message.finish_reason
                started[i].set()
            results[i] = (len(tokens), finish)
        except grpc.RpcError as err:
            results[i] = err
        finally:
            started[i].set()

    def http_stream(i: int) -> None:
        try:
            chunks = list(client.completions.create(model=model, prompt=f"Story {i}: once upon a time",
                                                    max_tokens=MAX_NEW, temperature=0, stream=True,
                                                    stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True}))
            results[i] = (chunks[-1].usage.completion_tokens, chunks[-2].choices[0].finish_reason)
        except openai.OpenAIError as err:
            results[i] = err
        finally:
            started[i].set()

    threads = [threading.Thread(target=grpc_stream if i < 6 else http_stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for event in started[:6]:
        assert event.wait(120)  # every gRPC stream has its first tokens
    time.sleep(1.0)  # the HTTP streams are under way too
    process.popen.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    with grpc.insecure_channel(router) as channel:  # health says so at once; new requests are refused
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError:
                status = None  # the server may refuse the call itself while it drains
            if status != health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.1)
        assert status != health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as refused:
        list(stream(router, make_request("A late request.", max_new_tokens=4), timeout_s=30))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    for t in threads:
        t.join(timeout=240)
    assert all(r == (MAX_NEW, 1) for r in results[:6]), results  # FINISH_REASON_LENGTH, every token
    assert all(r == (MAX_NEW, "length") for r in results[6:]), results
    assert process.popen.wait(timeout=120) == 0  # it stopped once they were done
    assert time.monotonic() - signalled < 120
