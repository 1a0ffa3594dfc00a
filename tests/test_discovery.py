"""Replica discovery: pool flags, the EndpointSlice watcher against a Kubernetes API double (a real HTTP server),
requests waiting while no target is left, and, end to end, a router whose pools change under running requests."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from k8s_api_double import Endpoint, KubernetesApiDouble
from kubernetes import client
from live_sequences import wait_live

from router.discovery import EndpointSliceWatcher, StaticWatcher, ready_addresses, resolve_namespace
from specfleet.client import make_request, stream
from specfleet.config import RouterConfig, ServicePool, StaticPool, parse_pool
from specfleet.launcher import free_port, wait_serving
from specfleet.protos import draft_pb2_grpc, generate_pb2, generate_pb2_grpc, target_pb2_grpc

NAMESPACE = "fleet"

# ---------------------------------------------------------------------------------------------------------------------
# Pool flags


@pytest.mark.parametrize("text, pool", [
    ("10.0.0.1:50052, 10.0.0.2:50052", StaticPool(("10.0.0.1:50052", "10.0.0.2:50052"))),
    ("", StaticPool(())),
    ("k8s://fleet-target.llm:50052", ServicePool("fleet-target", "llm", "50052")),
    ("k8s://fleet-target:grpc", ServicePool("fleet-target", "", "grpc")),
    ("k8s://t.llm:grpc", ServicePool("t", "llm", "grpc")),
])
def test_pools_parse(text: str, pool) -> None:
    assert parse_pool(text, "--targets") == pool
    assert parse_pool(str(pool), "--targets") == pool


@pytest.mark.parametrize("text, words", [
    ("k8s://fleet-target.llm", "k8s://<service>"),
    ("k8s://Fleet.llm:50052", "k8s://<service>"),
    ("k8s://a.b.c:50052", "k8s://<service>"),
    ("k8s://fleet.llm:70000", "port must be in"),
    ("k8s://fleet.llm:0", "port must be in"),
    ("10.0.0.1:50052,k8s://fleet.llm:grpc", "cannot be mixed"),
    ("10.0.0.1", "is not host:port"),
])
def test_bad_pools_are_refused_with_the_flag_named(text: str, words: str) -> None:
    with pytest.raises(ValueError, match="--targets") as caught:
        RouterConfig(targets=text)
    assert words in str(caught.value)


def test_a_router_with_service_pools_speculates() -> None:
    config = RouterConfig(targets="k8s://t.llm:grpc", drafts="k8s://d.llm:grpc")
    assert config.speculates and config.draft_pool == ServicePool("d", "llm", "grpc")
    assert not RouterConfig(targets="k8s://t.llm:grpc", drafts="").speculates
    assert not RouterConfig(targets="k8s://t.llm:grpc", drafts="k8s://d.llm:grpc", depth="0").speculates


def test_namespace_defaults_to_the_routers_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "serving")
    assert resolve_namespace(ServicePool("t", "", "grpc")) == "serving"
    assert resolve_namespace(ServicePool("t", "llm", "grpc")) == "llm"


# ---------------------------------------------------------------------------------------------------------------------
# Reading one EndpointSlice


def _slice(endpoints: list[tuple[list[str], client.V1EndpointConditions | None]],
           ports: dict[str, int]) -> client.V1EndpointSlice:
    return client.V1EndpointSlice(
        address_type="IPv4", metadata=client.V1ObjectMeta(name="s"),
        endpoints=[client.V1Endpoint(addresses=found, conditions=conditions) for found, conditions in endpoints],
        ports=[client.DiscoveryV1EndpointPort(name=name, port=port) for name, port in ports.items()])


def test_only_ready_endpoints_count_and_missing_ready_means_ready() -> None:
    conditions = client.V1EndpointConditions
    endpoint_slice = _slice([
        (["10.0.0.1"], conditions(ready=True)),
        (["10.0.0.2"], None),
        (["10.0.0.3"], conditions()),
        (["10.0.0.4"], conditions(ready=False, serving=True, terminating=True)),
        (["fd00::5", "10.0.0.5"], conditions(ready=True)),
    ], {"grpc": 50052, "metrics": 9464})
    expected = {"10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.3:50052", "[fd00::5]:50052"}
    assert ready_addresses(endpoint_slice, "grpc") == expected
    assert ready_addresses(endpoint_slice, "50052") == expected
    assert ready_addresses(endpoint_slice, "9464") == {a.replace("50052", "9464") for a in expected}
    assert ready_addresses(endpoint_slice, "http") == set()  # no such port on this slice


# ---------------------------------------------------------------------------------------------------------------------
# The watcher, against the API double


@pytest.fixture
def api() -> Iterator[KubernetesApiDouble]:
    with KubernetesApiDouble() as double:
        yield double


def _watcher(api: KubernetesApiDouble, service: str = "target", port: str = "grpc") -> EndpointSliceWatcher:
    configuration = client.Configuration(host=api.url)
    return EndpointSliceWatcher(ServicePool(service, NAMESPACE, port), client.ApiClient(configuration),
                                watch_timeout_s=2, backoff_s=(0.05, 0.2))


def _set(api: KubernetesApiDouble, name: str, *endpoints: Endpoint, service: str = "target",
         port: int = 50052) -> None:
    api.set_slice(NAMESPACE, name, service, list(endpoints), {"grpc": port, "metrics": 9464})


async def _next(sets: AsyncIterator[frozenset[str]], timeout_s: float = 10) -> set[str]:
    return set(await asyncio.wait_for(anext(sets), timeout_s))


def test_watcher_follows_adds_removals_and_readiness(api: KubernetesApiDouble) -> None:
    async def scenario() -> None:
        sets = aiter(_watcher(api).addresses())
        assert await _next(sets) == set()  # the Service has no slices yet: known, and empty
        _set(api, "target-a", Endpoint("10.0.0.1"), Endpoint("10.0.0.2", ready=None))
        _set(api, "other", Endpoint("10.9.9.9"), service="draft")  # another Service's slice: not ours
        assert await _next(sets) == {"10.0.0.1:50052", "10.0.0.2:50052"}
        _set(api, "target-b", Endpoint("10.0.1.1"), Endpoint("10.0.1.2", ready=False), port=6000)
        assert await _next(sets) == {"10.0.0.1:50052", "10.0.0.2:50052", "10.0.1.1:6000"}
        _set(api, "target-a", Endpoint("10.0.0.1", ready=False), Endpoint("10.0.0.2"))  # a pod going away
        assert await _next(sets) == {"10.0.0.2:50052", "10.0.1.1:6000"}
        api.delete_slice(NAMESPACE, "target-b")
        assert await _next(sets) == {"10.0.0.2:50052"}
        await sets.aclose()

    asyncio.run(scenario())


def test_watcher_lists_again_after_410_gone(api: KubernetesApiDouble) -> None:
    async def scenario() -> None:
        _set(api, "target-a", Endpoint("10.0.0.1"))
        sets = aiter(_watcher(api).addresses())
        assert await _next(sets) == {"10.0.0.1:50052"}
        await _until(lambda: "watch" in api.requests)
        # History compacted while the watcher was away: resuming gets 410, only a fresh list shows the change.
        api.expire_history()
        _set(api, "target-a", Endpoint("10.0.0.1"), Endpoint("10.0.0.7"))
        assert await _next(sets) == {"10.0.0.1:50052", "10.0.0.7:50052"}
        assert api.requests.count("list") == 2
        await sets.aclose()

    asyncio.run(scenario())


def test_watcher_reconnects_after_the_stream_drops_and_errors(api: KubernetesApiDouble) -> None:
    async def scenario() -> None:
        _set(api, "target-a", Endpoint("10.0.0.1"))
        sets = aiter(_watcher(api).addresses())
        assert await _next(sets) == {"10.0.0.1:50052"}
        await _until(lambda: "watch" in api.requests)
        api.fail_next(3)  # the API server answers 500 for a while: the watcher backs off and tries again
        api.drop_watches()
        _set(api, "target-a", Endpoint("10.0.0.1"), Endpoint("10.0.0.8"))
        assert await _next(sets) == {"10.0.0.1:50052", "10.0.0.8:50052"}
        api.delete_slice(NAMESPACE, "target-a")
        assert await _next(sets) == set()
        assert api.requests.count("list") == 1  # resumed from its resourceVersion: no need to list again
        await sets.aclose()

    asyncio.run(scenario())


def test_watcher_survives_server_side_watch_timeouts(api: KubernetesApiDouble) -> None:
    async def scenario() -> None:
        sets = aiter(_watcher(api).addresses())
        assert await _next(sets) == set()
        await _until(lambda: api.requests.count("watch") >= 2, timeout_s=10)  # each watch ends after 2 s
        _set(api, "target-a", Endpoint("10.0.0.1"))
        assert await _next(sets) == {"10.0.0.1:50052"}
        await sets.aclose()

    asyncio.run(scenario())


def test_static_pool_is_one_set() -> None:
    async def scenario() -> list[frozenset[str]]:
        return [s async for s in StaticWatcher(StaticPool(("a:1", "b:2"))).addresses()]

    assert asyncio.run(scenario()) == [frozenset({"a:1", "b:2"})]


async def _until(condition, timeout_s: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------------------
# End to end: real services, a router whose pools are Services in the API double

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


class Running:
    """One streaming request on a thread: its tokens, and whether its first message has come."""

    def __init__(self, pool: ThreadPoolExecutor, address: str, request: generate_pb2.GenerateRequest) -> None:
        self.started = threading.Event()
        self.tokens: list[int] = []
        self.future = pool.submit(self._run, address, request)

    def _run(self, address: str, request: generate_pb2.GenerateRequest) -> list[int]:
        for message in stream(address, request, timeout_s=300):
            self.tokens.extend(message.token_ids)
            self.started.set()
        return self.tokens


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
        expected = [r.future.result() for r in [Running(pool, plain, q) for q in _requests()]]

    with KubernetesApiDouble() as api, ThreadPoolExecutor(len(PROMPTS) + 2) as pool:
        _publish(api, "target", target_a)
        _publish(api, "draft", ngram)
        port = free_port()
        process = cluster.deployment.start(
            "router-discovery",
            [sys.executable, "-m", "specfleet.cli", "router", "--port", str(port), "--depth", "4",
             "--targets", f"k8s://target.{E2E_NAMESPACE}:grpc", "--drafts", f"k8s://draft.{E2E_NAMESPACE}:grpc",
             "--redis-url", cluster.redis_url, "--target-wait-s", "3"],
            env={"KUBECONFIG": str(api.write_kubeconfig(tmp_path / "kubeconfig"))})
        router = f"127.0.0.1:{port}"
        wait_serving(process, router, timeout_s=300)
        assert list(_server_info(router).target_addresses) == [target_a]
        requests = _requests()

        # A second target joins while the first wave runs on the first; the second wave goes to it.
        first_wave = [Running(pool, router, q) for q in requests[:4]]
        assert all(r.started.wait(120) for r in first_wave)
        _publish(api, "target", target_b)
        _eventually(lambda: sorted(_server_info(router).target_addresses) == sorted([target_a, target_b]))
        second_wave = [Running(pool, router, q) for q in requests[4:]]
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
            Running(pool, router, requests[0]).future.result()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "no target replica" in caught.value.details()
        # ... or, if a target comes back in time, is served by it, drafting again on a returning draft.
        waiting = Running(pool, router, requests[1])
        _eventually(lambda: _server_info(router).queued_requests == 1)
        _publish(api, "draft", ngram)
        _publish(api, "target", target_a)
        assert waiting.future.result() == expected[1]
        info = _server_info(router)
        assert list(info.target_addresses) == [target_a] and list(info.draft_addresses) == [ngram]

    log = process.log_tail(400)
    assert f"target {target_a} left; " in log and "moved to the other 1 target(s)" in log
    assert f"draft {ngram} left; no draft left" in log
