"""A stand-in for the Kubernetes API server, enough for EndpointSlice discovery: a real HTTP server on 127.0.0.1
serving list and watch of ``discovery.k8s.io/v1`` EndpointSlices, whose state the test changes.

Watches stream newline-delimited JSON events (chunked), from a resourceVersion on, as the real API server does; a
watch from a version older than the kept history gets the real server's ERROR event with a 410 Status. The test can
also drop open watch streams and make the next requests fail.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

PREFIX = "/apis/discovery.k8s.io/v1/namespaces/"
SERVICE_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True)
class Endpoint:
    address: str
    ready: bool | None = True  # None: the condition is left out (Kubernetes reads that as ready)


@dataclass(frozen=True)
class Event:
    version: int
    namespace: str
    kind: str  # ADDED, MODIFIED, DELETED
    body: dict[str, Any]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-request (a watcher closing its stream) is normal here, not worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class KubernetesApiDouble:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._slices: dict[tuple[str, str], dict[str, Any]] = {}
        self._events: list[Event] = []
        self._version = 100
        self._oldest_watchable = 0  # a watch from an older version gets 410 Gone
        self._stream_generation = 0  # bumped to drop every open watch
        self._failures_left = 0
        self._closed = False
        self.requests: list[str] = []  # "list" or "watch", in order
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, name="k8s-api-double", daemon=True)

    def __enter__(self) -> KubernetesApiDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "double", "user": {"token": "not-checked"}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "double"}}]}))
        return path

    # -- the state the test changes ---------------------------------------------------------------

    def set_slice(self, namespace: str, name: str, service: str, endpoints: list[Endpoint],
                  ports: dict[str, int]) -> None:
        """Creates or replaces an EndpointSlice (ADDED or MODIFIED)."""
        with self._changed:
            self._version += 1
            kind = "MODIFIED" if (namespace, name) in self._slices else "ADDED"
            body = {
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": str(self._version),
                             "labels": {SERVICE_LABEL: service}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [e.address],
                               **({"conditions": {"ready": e.ready}} if e.ready is not None else {})}
                              for e in endpoints],
                "ports": [{"name": port_name, "port": port, "protocol": "TCP"} for port_name, port in ports.items()],
            }
            self._slices[(namespace, name)] = body
            self._events.append(Event(self._version, namespace, kind, body))
            self._changed.notify_all()

    def delete_slice(self, namespace: str, name: str) -> None:
        with self._changed:
            self._version += 1
            body = self._slices.pop((namespace, name))
            body = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self._version)}}
            self._events.append(Event(self._version, namespace, "DELETED", body))
            self._changed.notify_all()

    def expire_history(self) -> None:
        """Forgets every past event and drops open watches: resuming them gets 410 Gone (as after compaction)."""
        with self._changed:
            self._events.clear()
            self._oldest_watchable = self._version + 1
            self._stream_generation += 1
            self._changed.notify_all()

    def drop_watches(self) -> None:
        """Cuts every open watch stream mid-way, as a restarting API server or a broken connection would."""
        with self._changed:
            self._stream_generation += 1
            self._changed.notify_all()

    def fail_next(self, count: int) -> None:
        """The next ``count`` requests get 500 Internal Server Error."""
        with self._changed:
            self._failures_left = count

    # -- serving ----------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                double._serve(self)

        return Handler

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlparse(handler.path)
        parts = url.path[len(PREFIX):].split("/") if url.path.startswith(PREFIX) else []
        if len(parts) != 2 or parts[1] != "endpointslices":
            return self._send_json(handler, 404, _status(404, "NotFound", f"no such path {url.path}"))
        namespace = parts[0]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        service = query.get("labelSelector", "").removeprefix(f"{SERVICE_LABEL}=")
        watching = query.get("watch") in ("true", "1")
        with self._changed:
            self.requests.append("watch" if watching else "list")
            if self._failures_left:
                self._failures_left -= 1
                return self._send_json(handler, 500, _status(500, "InternalError", "the double was told to fail"))
            if not watching:
                items = [body for (ns, _), body in sorted(self._slices.items())
                         if ns == namespace and _service(body) == service]
                return self._send_json(handler, 200, {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                                                      "metadata": {"resourceVersion": str(self._version)},
                                                      "items": items})
        self._stream(handler, namespace, service, int(query.get("resourceVersion") or 0),
                     float(query.get("timeoutSeconds") or 60))

    def _stream(self, handler: BaseHTTPRequestHandler, namespace: str, service: str, since: int,
                timeout_s: float) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        with self._changed:
            generation = self._stream_generation
            if since < self._oldest_watchable:
                expired = {"type": "ERROR", "object": _status(410, "Expired", f"too old resource version: {since}")}
                self._send_chunk(handler, expired)
                return self._end_stream(handler)
            sent = since
            deadline_left = timeout_s
            while True:
                if self._closed or generation != self._stream_generation:
                    handler.close_connection = True  # no final chunk: the client sees the stream break off
                    return
                for event in self._events:
                    if event.version > sent and event.namespace == namespace and _service(event.body) == service:
                        self._send_chunk(handler, {"type": event.kind, "object": event.body})
                if self._events:
                    sent = max(sent, self._events[-1].version)
                if deadline_left <= 0:
                    return self._end_stream(handler)
                self._changed.wait(0.1)
                deadline_left -= 0.1

    @staticmethod
    def _send_chunk(handler: BaseHTTPRequestHandler, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode() + b"\n"
        handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        handler.wfile.flush()

    @staticmethod
    def _end_stream(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()

    @staticmethod
    def _send_json(handler: BaseHTTPRequestHandler, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def _service(body: dict[str, Any]) -> str:
    return body["metadata"]["labels"].get(SERVICE_LABEL, "")


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message,
            "code": code}
