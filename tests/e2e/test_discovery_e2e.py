"""Replica discovery end to end: real services, and a router whose pools are Kubernetes Services in an API double
(a real HTTP server); the pools change under running requests."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest
from k8s_api_double import Endpoint, KubernetesApiDouble
from live_sequences import wait_live
from streaming import Streaming

from specfleet.client import make_request
from specfleet.launcher import free_port, wait_serving
from specfleet.protos import draft_pb2_grpc, generate_pb2, generate_pb2_grpc, target_pb2_grpc

E2E_NAMESPACE = "e2e"
MAX_NEW = 40
PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is the capital of France?",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "List three colors of the rainbow.",
    "Explain in one sentence why the sky is blue.",
    "Translate 'good morning' into Spanish.",
    "Fix the typo: 'The quick brwn fox jumps over the lazy dog.'",
    "Count: 1, 2, 3, 4, 5, 6,",
]


def _requests() -> list[generate_pb2.GenerateRequest]:
    return [make_request(p, max_new_tokens=MAX_NEW, ignore_eos=True) for p in PROMPTS]


def _server_info(router: str) -> generate_pb2.GetServerInfoResponse:
    with grpc.insecure_channel(router) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        return stub.GetServerInfo(generate_pb2.GetServerInfoRequest(), timeout=10)


def _eventually(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the router did not follow the change"
        time.sleep(0.05)


def _publish(api: KubernetesApiDouble, service: str, address: str, ready: bool = True) -> None:
    """One slice per replica: on 127.0.0.1 each replica has its own port, and a slice's ports are shared."""
    host, port = address.rsplit(":", 1)
    api.set_slice(E2E_NAMESPACE, f"{service}-{port}", service, [Endpoint(host, ready=ready)], {"grpc": int(port)})


@pytest.mark.real_model
def test_router_follows_its_pools_without_failing_or_changing_a_request(cluster, smollm2_dir, tmp_path) -> None:
    target_a, ngram = cluster.addresses["target"], cluster.addresses["ngram"]
    target_b = cluster.start("target-b", "target", ["--model", str(smollm2_dir), "--num-slots", "24",
                                                    "--max-seq-len", "1024", "--redis-url", cluster.redis_url])
    plain = cluster.router("router-plain", target="target", draft=None, depth=0)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        expected = [r.future.result() for r in [Streaming(pool, plain, q) for q in _requests()]]

    with KubernetesApiDouble() as api, ThreadPoolExecutor(len(PROMPTS) + 2) as pool:
        _publish(api, "target", target_a)
        _publish(api, "draft", ngram)
        port, http_port = free_port(), free_port()
        process = cluster.deployment.start(
            "router-discovery",
            [sys.executable, "-m", "specfleet.cli", "router", "--port", str(port), "--http-port", str(http_port),
             "--depth", "4",
             "--targets", f"k8s://target.{E2E_NAMESPACE}:grpc", "--drafts", f"k8s://draft.{E2E_NAMESPACE}:grpc",
             "--redis-url", cluster.redis_url, "--target-wait-s", "3"],
            env={"KUBECONFIG": str(api.write_kubeconfig(tmp_path / "kubeconfig"))})
        router = f"127.0.0.1:{port}"
        wait_serving(process, router, timeout_s=300)
        assert list(_server_info(router).target_addresses) == [target_a]
        requests = _requests()

        # A second target joins while the first wave runs on the first; the second wave goes to it.
        first_wave = [Streaming(pool, router, q) for q in requests[:4]]
        assert all(r.started.wait(120) for r in first_wave)
        _publish(api, "target", target_b)
        _eventually(lambda: sorted(_server_info(router).target_addresses) == sorted([target_a, target_b]))
        second_wave = [Streaming(pool, router, q) for q in requests[4:]]
        assert all(r.started.wait(120) for r in second_wave)

        # The first target turns not-ready and the only draft goes away, both mid-generation: the first wave moves
        # to the second target (re-prefilled there) and everything goes on at depth 0.
        assert not all(r.future.done() for r in first_wave), "the first wave ended too soon to test a move"
        _publish(api, "target", target_a, ready=False)
        api.delete_slice(E2E_NAMESPACE, f"draft-{ngram.rsplit(':', 1)[1]}")
        _eventually(lambda: list(_server_info(router).target_addresses) == [target_b])
        _eventually(lambda: not _server_info(router).draft_addresses)
        assert [r.future.result() for r in [*first_wave, *second_wave]] == expected
        # Both left the pools but still run: the router freed what it had left on them.
        assert wait_live(ngram, draft_pb2_grpc.DraftServiceStub, 0) == 0
        assert wait_live(target_a, target_pb2_grpc.TargetServiceStub, 0) == 0

        # No target at all: a request waits, and is answered UNAVAILABLE once --target-wait-s has passed ...
        _publish(api, "target", target_b, ready=False)
        _eventually(lambda: not _server_info(router).target_addresses)
        with pytest.raises(grpc.RpcError) as caught:
            Streaming(pool, router, requests[0]).future.result()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "no target replica" in caught.value.details()
        # the OpenAI API says the same with a 503, and its health check fails
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as unavailable:
            client.completions.create(model=client.models.list().data[0].id, prompt="hello", max_tokens=4)
        assert unavailable.value.status_code == 503 and "no target replica" in unavailable.value.message
        assert httpx.get(f"http://127.0.0.1:{http_port}/health").status_code == 503
        # ... or, if a target comes back in time, is served by it, drafting again on a returning draft.
        waiting = Streaming(pool, router, requests[1])
        _eventually(lambda: _server_info(router).queued_requests == 1)
        _publish(api, "draft", ngram)
        _publish(api, "target", target_a)
        assert waiting.future.result() == expected[1]
        info = _server_info(router)
        assert list(info.target_addresses) == [target_a] and list(info.draft_addresses) == [ngram]

    log = process.log_tail(400)
    assert f"target {target_a} left; " in log and "moved to the other 1 target(s)" in log
    assert f"draft {ngram} left; no draft left" in log
