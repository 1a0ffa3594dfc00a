"""Where a pool's replicas are: a fixed list, or the ready endpoints of a Kubernetes Service, followed as they change.

Both look the same to the router: a ``PoolWatcher`` yields the pool's whole address set (``host:port`` strings)
first once it is known, then again each time it changes.

The Kubernetes watcher reads the Service's EndpointSlices (``discovery.k8s.io/v1``, label
``kubernetes.io/service-name``) with the official client: list, then watch from the list's resourceVersion; a watch
that ends is resumed from the last version seen, a 410 Gone (history compacted) re-lists, any other error retries
with exponential backoff. The client is synchronous, so the loop runs in a thread and hands sets to asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from specfleet.config import Pool, ServicePool, StaticPool

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, V1EndpointSlice

log = logging.getLogger("specfleet.router")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
HTTP_GONE = 410


class PoolWatcher(Protocol):
    pool: Pool

    def addresses(self) -> AsyncIterator[frozenset[str]]:
        """The pool's addresses: the first set once known, then one per change (never two equal in a row)."""
        ...


def watcher_for(pool: Pool) -> PoolWatcher:
    if isinstance(pool, ServicePool):
        return EndpointSliceWatcher(pool)
    return StaticWatcher(pool)


class StaticWatcher:
    """A fixed list: one set, and no change ever."""

    def __init__(self, pool: StaticPool) -> None:
        self.pool = pool

    async def addresses(self) -> AsyncIterator[frozenset[str]]:
        yield frozenset(self.pool.addresses)


def ready_addresses(endpoint_slice: V1EndpointSlice, port: str) -> set[str]:
    """``host:port`` of the slice's ready endpoints (a missing ``ready`` condition means ready, as Kubernetes says).
    ``port`` is a port name, looked up among the slice's ports, or a number, used as is."""
    if port.isdigit():
        number: int | None = int(port)
    else:
        number = next((p.port for p in endpoint_slice.ports or () if p.name == port), None)
        if number is None:
            return set()
    found = set()
    for endpoint in endpoint_slice.endpoints or ():
        conditions = endpoint.conditions
        if conditions is not None and conditions.ready is False:
            continue
        if endpoint.addresses:  # several addresses of one endpoint are the same pod: the first will do
            host = endpoint.addresses[0]
            found.add(f"[{host}]:{number}" if ":" in host else f"{host}:{number}")
    return found


def resolve_namespace(pool: ServicePool) -> str:
    """The pool's namespace, else the router's own (the chart sets POD_NAMESPACE), else ``default``."""
    if pool.namespace:
        return pool.namespace
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if SERVICE_ACCOUNT_NAMESPACE.exists():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return "default"


def default_api_client() -> ApiClient:
    """In-cluster credentials (the pod's service account), else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


class EndpointSliceWatcher:
    """The ready endpoints of one Service, from its EndpointSlices."""

    def __init__(self, pool: ServicePool, api_client: ApiClient | None = None, *, watch_timeout_s: int = 300,
                 backoff_s: tuple[float, float] = (0.5, 30.0)) -> None:
        self.pool = pool
        self.namespace = resolve_namespace(pool)
        self.watch_timeout_s = watch_timeout_s  # the server ends each watch after this; it is then resumed
        self.backoff_s = backoff_s  # first and longest wait between attempts after an error
        self._api_client = api_client
        self._slices: dict[str, set[str]] = {}  # ready addresses by EndpointSlice name
        self._published: frozenset[str] | None = None

    async def addresses(self) -> AsyncIterator[frozenset[str]]:
        running = asyncio.get_running_loop()
        queue: asyncio.Queue[frozenset[str]] = asyncio.Queue()
        stop = threading.Event()

        def publish(found: frozenset[str]) -> None:
            try:
                running.call_soon_threadsafe(queue.put_nowait, found)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                stop.set()

        thread = threading.Thread(target=self._follow, args=(publish, stop), name=f"watch {self.pool}", daemon=True)
        thread.start()
        try:
            while True:
                found = await queue.get()
                while not queue.empty():  # only the latest set matters
                    found = queue.get_nowait()
                yield found
        finally:
            stop.set()  # the thread ends at its next event or timeout; it is a daemon, so it never holds up exit

    # -- in the watcher's thread ---------------------------------------------------------------------

    def _follow(self, publish: Callable[[frozenset[str]], None], stop: threading.Event) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = client.DiscoveryV1Api(self._api_client or default_api_client())
        resource_version: str | None = None
        delay = self.backoff_s[0]
        while not stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list(api)
                    self._publish(publish)
                resource_version = self._watch(api, resource_version, publish, stop)
                delay = self.backoff_s[0]
            except ApiException as err:
                if err.status == HTTP_GONE:
                    log.info("%s: watch history expired (410 Gone); listing again", self.pool)
                    resource_version = None
                    continue
                log.warning("%s: Kubernetes API error %s %s; retrying in %.1f s", self.pool, err.status,
                            err.reason, delay)
                stop.wait(delay)
                delay = min(delay * 2, self.backoff_s[1])
            except Exception as err:  # connection refused or dropped, timeouts: the API server may come back
                log.warning("%s: lost the Kubernetes API (%s: %s); retrying in %.1f s", self.pool,
                            type(err).__name__, err, delay)
                stop.wait(delay)
                delay = min(delay * 2, self.backoff_s[1])
        log.debug("%s: watch stopped", self.pool)

    def _list(self, api) -> str:
        """Replaces what is known with a fresh list; returns its resourceVersion."""
        listed = api.list_namespaced_endpoint_slice(self.namespace, label_selector=self._selector,
                                                    _request_timeout=30)
        self._slices = {s.metadata.name: ready_addresses(s, self.pool.port) for s in listed.items or ()}
        return listed.metadata.resource_version

    def _watch(self, api, resource_version: str, publish: Callable[[frozenset[str]], None],
               stop: threading.Event) -> str:
        """Applies watch events until the stream ends; returns the last resourceVersion seen."""
        from kubernetes import watch

        stream = watch.Watch()
        events = stream.stream(api.list_namespaced_endpoint_slice, self.namespace, label_selector=self._selector,
                               resource_version=resource_version, allow_watch_bookmarks=True,
                               timeout_seconds=self.watch_timeout_s, _request_timeout=self.watch_timeout_s + 30)
        for event in events:
            if stop.is_set():
                stream.stop()
                break
            kind, endpoint_slice = event["type"], event["object"]
            if kind in ("ADDED", "MODIFIED"):
                self._slices[endpoint_slice.metadata.name] = ready_addresses(endpoint_slice, self.pool.port)
            elif kind == "DELETED":
                self._slices.pop(endpoint_slice.metadata.name, None)
            else:  # BOOKMARK: only moves the resourceVersion on
                continue
            self._publish(publish)
        return stream.resource_version or resource_version

    def _publish(self, publish: Callable[[frozenset[str]], None]) -> None:
        found = frozenset().union(*self._slices.values())
        if found == self._published:
            return
        before = self._published or frozenset()
        added, removed = sorted(found - before), sorted(before - found)
        log.info("%s: %d ready%s%s", self.pool, len(found), f"; added {', '.join(added)}" if added else "",
                 f"; removed {', '.join(removed)}" if removed else "")
        self._published = found
        publish(found)

    @property
    def _selector(self) -> str:
        return f"{SERVICE_NAME_LABEL}={self.pool.service}"
