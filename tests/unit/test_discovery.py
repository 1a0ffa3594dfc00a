"""Replica discovery: pool flags, reading EndpointSlices, and the watcher against a Kubernetes API double (a real HTTP
server on loopback). The router following its pools end to end is in tests/e2e/test_discovery_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from k8s_api_double import Endpoint, KubernetesApiDouble
from kubernetes import client

from router.discovery import EndpointSliceWatcher, StaticWatcher, ready_addresses, resolve_namespace
from specfleet.config import RouterConfig, ServicePool, StaticPool, parse_pool

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
