"""OpenTelemetry in the three services: every metric they export, the SDK set-up, and trace context over gRPC.

Metrics are served to Prometheus on ``--metrics-port`` (``/metrics``; 0: no endpoint) and pushed over OTLP when a
collector is configured, as traces are (over gRPC, or HTTP with ``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``).
Everything else is the standard ``OTEL_*`` environment:

    OTEL_EXPORTER_OTLP_ENDPOINT                  the collector, e.g. http://otel-collector:4317 (or the per-signal
    (_TRACES_ENDPOINT, _METRICS_ENDPOINT)        variables); unset: nothing is pushed and no spans are made
    OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER  otlp (default), console or none
    OTEL_SERVICE_NAME                            default specfleet-<role>
    OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*, OTEL_METRIC_EXPORT_INTERVAL, OTEL_PROPAGATORS, OTEL_SDK_DISABLED ...
                                                 read by the SDK as usual

Every metric name is in `RouterMetrics` and `ServiceMetrics` below. The names are chosen so that Prometheus shows
exactly the names the chart's dashboards use: counters get ``_total``, and the unit is appended (``s`` ->
``_seconds``; an annotation such as ``{token}`` adds nothing). Histogram buckets follow the unit (`BUCKETS`). The
router also serves its measurements under vLLM's names on /metrics (`specfleet.vllm_metrics`).

Traces: the router makes a ``request`` span per request (admission to the end of its stream; a child of the caller's
span when the Generate call carries W3C trace context) and a ``step`` span per step. A step serves many requests, so
its span cannot be a child of all of them: it starts a trace of its own and carries a span link to the request span
of every sequence in its batch, and the Propose/Verify calls of the step are its children. The calls carry the trace
context in their gRPC metadata (`ClientTracing`), and the draft and target services continue it in a server span
(`ServerTracing`): request <-link- step -> Propose/Verify client span -> server span in the draft/target service.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from opentelemetry import propagate, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, NoOpMeter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import INVALID_SPAN, Link, NoOpTracer, Span, SpanKind, Status, StatusCode, Tracer
from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from specfleet.stats import StepStats
from specfleet.vllm_metrics import VllmMetrics

log = logging.getLogger("specfleet.otel")

SCOPE = "specfleet"
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
"""The OTLP transports the services export over (OTEL_EXPORTER_OTLP_PROTOCOL); the SDK's http/json exporter is not
published for Python."""
# Histogram bucket boundaries by unit: latencies from 1 ms to a minute, draft positions (a depth or an accepted
# count is an integer in [0, 16]) one bucket each, batch sizes in powers of two.
SECONDS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0,
                   5.0, 10.0, 20.0, 30.0, 60.0)
# A whole request, or its wait for a slot, may take many minutes.
REQUEST_SECONDS_BUCKETS = (*SECONDS_BUCKETS, 120.0, 300.0, 600.0, 1800.0, 3600.0)
BUCKETS = {
    "s": SECONDS_BUCKETS,
    "{token}": tuple(float(k) for k in range(17)),
    "{sequence}": (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0),
}


# ---------------------------------------------------------------------------------------------------------------------
# set-up


@dataclass
class Otel:
    """What a service gets from `setup`: a meter and a tracer (no-ops when nothing would read them), the gRPC
    interceptors that carry trace context, and `shutdown`, which flushes what is pending. ``Otel()`` is all no-ops."""

    meter: Meter = field(default_factory=lambda: NoOpMeter(SCOPE))
    tracer: Tracer = field(default_factory=NoOpTracer)
    metrics_port: int = 0  # where /metrics is served (0: nowhere)
    registry: CollectorRegistry | None = None  # what /metrics serves, for metrics OpenTelemetry cannot name
    _closers: list[Callable[[], Any]] = field(default_factory=list, repr=False)

    @property
    def tracing(self) -> bool:
        return not isinstance(self.tracer, NoOpTracer)

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [ClientTracing(self.tracer)] if self.tracing else []

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [ServerTracing(self.tracer)] if self.tracing else []

    def shutdown(self) -> None:
        for close in reversed(self._closers):
            try:
                close()
            except Exception:  # a collector that went away must not stop the shutdown
                log.warning("OpenTelemetry shutdown step failed", exc_info=True)
        self._closers.clear()


def setup(role: str, host: str = "127.0.0.1", metrics_port: int = 0) -> Otel:
    """The SDK for service ``role`` as the ``OTEL_*`` environment asks, plus /metrics on ``host:metrics_port``."""
    otel = Otel()
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        log.info("OTEL_SDK_DISABLED: %s exports no metrics and no traces", role)
        return otel
    resource = service_resource(role)
    span_exporters = _exporters("traces")
    if span_exporters:
        tracer_provider = TracerProvider(resource=resource)
        for exporter in span_exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        otel.tracer = tracer_provider.get_tracer(SCOPE)
        otel._closers.append(tracer_provider.shutdown)

    # pushed every OTEL_METRIC_EXPORT_INTERVAL ms (60 s by default)
    readers: list[Any] = [PeriodicExportingMetricReader(exporter) for exporter in _exporters("metrics")]
    registry = None
    if metrics_port:
        disable_created_metrics()  # as vLLM: no *_created series beside each counter and histogram
        registry = CollectorRegistry()  # this service's own, so several services can live in one test process
        ProcessCollector(registry=registry)
        readers.append(PrometheusMetricReader(registry=registry, scope_info_enabled=False))
    if readers:
        meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        otel.meter = meter_provider.get_meter(SCOPE)
        otel._closers.append(meter_provider.shutdown)
    if registry is not None:
        server = _serve_metrics(host, metrics_port, registry)
        otel.metrics_port, otel.registry = server.server_port, registry
        otel._closers += [server.server_close, server.shutdown]  # run last to first: stop serving, then close
        log.info("%s metrics on http://%s:%d/metrics", role, host, otel.metrics_port)
    return otel


def _serve_metrics(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """/metrics on ``host:port`` (a thread of its own) in Prometheus' text format, whatever the scraper accepts.

    prometheus_client's OpenMetrics output turns the ``:`` of vLLM's names into ``_`` in the sample lines but not in
    their TYPE lines (prometheus/client_python#1177), so a Prometheus that negotiates OpenMetrics would store an
    untyped ``vllm_num_requests_waiting``. The text format keeps every name as it is.
    """
    metrics = make_wsgi_app(registry)

    def text_format(environ: dict[str, Any], start_response: Any) -> Any:
        return metrics({**environ, "HTTP_ACCEPT": "text/plain"}, start_response)

    class Server(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    server = make_server(host, port, text_format, Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per scrape is noise
        pass


def service_resource(role: str) -> Resource:
    """The SDK's resource (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME), named specfleet-<role> if nothing names it."""
    resource = Resource.create({"specfleet.role": role})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: f"specfleet-{role}"}))
    return resource


def _exporters(signal: str) -> list[Any]:
    """The exporters OTEL_<SIGNAL>_EXPORTER asks for (``signal``: traces or metrics); otlp needs an endpoint."""
    variable = f"OTEL_{signal.upper()}_EXPORTER"
    names = {n.strip().lower() for n in os.environ.get(variable, "otlp").split(",") if n.strip()}
    if "none" in names:
        return []
    for name in sorted(names - {"otlp", "console"}):
        log.warning("%s=%s is not supported here (otlp, console or none); ignored", variable, name)
    protocol = (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    if "otlp" in names:
        if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")):
            names.discard("otlp")  # no collector configured: nothing to push to
        elif protocol not in OTLP_PROTOCOLS:
            log.warning("OTLP protocol %r is not supported here (%s): %s go over grpc", protocol,
                        " or ".join(OTLP_PROTOCOLS), signal)
            protocol = "grpc"
    names &= {"otlp", "console"}
    if not names:
        return []
    # OTLP/HTTP posts protobuf to <endpoint>/v1/<signal>; OTLP/gRPC calls the collector's services on <endpoint>.
    over = "http" if protocol == "http/protobuf" else "grpc"
    if signal == "traces":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        otlp = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{over}.trace_exporter").OTLPSpanExporter
        kinds: dict[str, Callable[[], Any]] = {"otlp": otlp, "console": ConsoleSpanExporter}
    else:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        otlp = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{over}.metric_exporter").OTLPMetricExporter
        kinds = {"otlp": otlp, "console": ConsoleMetricExporter}
    return [kinds[name]() for name in sorted(names)]


# ---------------------------------------------------------------------------------------------------------------------
# the metrics (every name the services export is here)


def _gauge(read: Callable[[], float], attributes: dict[str, str] | None = None
           ) -> Callable[[CallbackOptions], Iterable[Observation]]:
    return lambda options: [Observation(read(), attributes)]


def _histogram(meter: Meter, name: str, unit: str, description: str,
               buckets: tuple[float, ...] | None = None) -> Histogram:
    """A histogram with the buckets of its unit (`BUCKETS`) unless given its own."""
    return meter.create_histogram(name, unit, description,
                                  explicit_bucket_boundaries_advisory=list(buckets or BUCKETS[unit]))


class RouterMetrics:
    """The router's metrics and spans. The step loop hands it a `StepStats` per step; nothing here runs per token.

    As Prometheus shows them: specfleet_requests_total{outcome,code}, specfleet_prompt_tokens_total,
    specfleet_generated_tokens_total, specfleet_time_to_first_token_seconds, specfleet_time_per_output_token_seconds,
    specfleet_e2e_request_latency_seconds, specfleet_request_queue_time_seconds, specfleet_step_batch_size,
    specfleet_speculation_depth, specfleet_accepted_tokens_per_step (histograms), specfleet_draft_tokens_total,
    specfleet_accepted_tokens_total, specfleet_draft_position_proposed_total{position},
    specfleet_draft_position_accepted_total{position}, specfleet_step_emitted_tokens_total{depth},
    specfleet_step_duration_seconds_total{depth}, specfleet_draft_latency_seconds{replica},
    specfleet_verify_latency_seconds{replica} (histograms), specfleet_reprefills_total{role} (0 per role from the
    start), specfleet_drafts_ahead_total{outcome}, specfleet_canary_replays_total,
    specfleet_canary_mismatches_total (0 from the start), and the gauges
    specfleet_queue_depth, specfleet_live_requests, specfleet_slot_usage, specfleet_redis_up.
    Beside them on /metrics, the same measurements under vLLM's names (`specfleet.vllm_metrics`).
    """

    def __init__(self, otel: Otel | None = None) -> None:
        otel = self._otel = otel or Otel()
        meter = self._meter = otel.meter
        self.tracer, self.tracing = otel.tracer, otel.tracing
        self.vllm = VllmMetrics()  # named for the model once it is known (`serve`)
        self.requests = meter.create_counter(
            "specfleet_requests", "{request}", "finished requests by outcome (ok, error, aborted, deadline) and "
            "gRPC status code; requests rejected at admission count as errors")
        self.prompt_tokens = meter.create_counter("specfleet_prompt_tokens", "{token}",
                                                  "prompt tokens of the requests admitted")
        self.generated_tokens = meter.create_counter("specfleet_generated_tokens", "{token}", "tokens generated")
        self.time_to_first_token = _histogram(
            meter, "specfleet_time_to_first_token", "s", "from admission to the step that produced the first token")
        self.time_per_output_token = _histogram(
            meter, "specfleet_time_per_output_token", "s", "per request: (last token - first token) / (tokens - 1)")
        self.e2e_request_latency = _histogram(meter, "specfleet_e2e_request_latency", "s",
                                              "from admission to the request's end", REQUEST_SECONDS_BUCKETS)
        self.request_queue_time = _histogram(meter, "specfleet_request_queue_time", "s",
                                             "from admission to a place in a step loop", REQUEST_SECONDS_BUCKETS)
        self.step_batch_size = _histogram(meter, "specfleet_step_batch_size", "{sequence}", "sequences in a step")
        self.speculation_depth = _histogram(meter, "specfleet_speculation_depth", "{token}",
                                            "depth chosen for a sequence in a step")
        self.accepted_tokens_per_step = _histogram(
            meter, "specfleet_accepted_tokens_per_step", "{token}", "draft tokens accepted, per sequence per step "
            "(sequences that got draft tokens)")
        self.draft_tokens = meter.create_counter("specfleet_draft_tokens", "{token}", "draft tokens verified")
        self.accepted_tokens = meter.create_counter("specfleet_accepted_tokens", "{token}", "draft tokens accepted")
        self.draft_position_proposed = meter.create_counter(
            "specfleet_draft_position_proposed", "{token}", "draft tokens verified at each position (0: the first)")
        self.draft_position_accepted = meter.create_counter(
            "specfleet_draft_position_accepted", "{token}", "draft tokens accepted at each position (0: the first)")
        self.step_emitted_tokens = meter.create_counter(
            "specfleet_step_emitted_tokens", "{token}", "tokens emitted by steps, by the step's largest depth")
        self.step_duration = meter.create_counter(
            "specfleet_step_duration", "s", "time spent in steps, by the step's largest depth (goodput by depth: "
            "rate of specfleet_step_emitted_tokens_total / rate of this)")
        self.draft_latency = _histogram(meter, "specfleet_draft_latency", "s",
                                        "Propose round trip seen by the router, by draft replica")
        self.verify_latency = _histogram(meter, "specfleet_verify_latency", "s",
                                         "Verify round trip seen by the router, by target replica")
        self.reprefills = meter.create_counter(
            "specfleet_reprefills", "{sequence}", "sequences resent whole because a service lost them, by role")
        self.drafts_ahead = meter.create_counter(
            "specfleet_drafts_ahead", "{proposal}", "drafts made ahead while the target verified (--draft-ahead), "
            "by outcome: used (they came true) or dropped")
        self.canary_replays = meter.create_counter(
            "specfleet_canary_replays", "{request}", "finished greedy requests generated again by plain decoding")
        self.canary_mismatches = meter.create_counter(
            "specfleet_canary_mismatches", "{request}", "canary replays whose answer differed from the request's")
        # A healthy fleet never re-prefills: without a zero from the start the series would not exist, and the
        # dashboards' re-prefill panel would say "No data" instead of 0.
        for role in ("draft", "target"):
            self.reprefills.add(0, {"role": role})
        for outcome in ("used", "dropped"):
            self.drafts_ahead.add(0, {"outcome": outcome})
        self.canary_replays.add(0)  # likewise for the canary's panel and alert
        self.canary_mismatches.add(0)

    def serve(self, model_name: str, queue_depth: Callable[[], int], live_requests: Callable[[], int],
              slot_usage: Callable[[], float], redis_up: Callable[[], bool]) -> None:
        """The router's state gauges, read when metrics are collected, and the vLLM-named series for
        ``model_name`` (the name the OpenAI API serves)."""
        meter = self._meter
        meter.create_observable_gauge("specfleet_queue_depth", [_gauge(queue_depth)], "{request}",
                                      "requests waiting for a slot")
        meter.create_observable_gauge("specfleet_live_requests", [_gauge(live_requests)], "{request}",
                                      "requests in the step loops")
        meter.create_observable_gauge("specfleet_slot_usage", [_gauge(slot_usage)], "1",
                                      "fraction of the targets' sequence slots held by this router's requests")
        meter.create_observable_gauge("specfleet_redis_up", [_gauge(lambda: int(redis_up()))], "1",
                                      "1 while the depth policy reads fleet telemetry from Redis")
        self.vllm = VllmMetrics(self._otel.registry, model_name)
        self.vllm.watch(running=live_requests, waiting=queue_depth, slot_usage=slot_usage)

    # -- requests ---------------------------------------------------------------------------------------------------

    def start_request(self, request_id: str, prompt_tokens: int, metadata: Any = ()) -> Span:
        """Counts an admitted request's prompt; its span (a child of the caller's span if ``metadata`` carries trace
        context)."""
        self.prompt_tokens.add(prompt_tokens)
        self.vllm.request_admitted(prompt_tokens)
        if not self.tracing:
            return INVALID_SPAN
        return self.tracer.start_span("request", context=propagate.extract(_carrier(metadata)), kind=SpanKind.SERVER,
                                      attributes={"specfleet.request_id": request_id,
                                                  "specfleet.prompt_tokens": prompt_tokens})

    def end_request(self, span: Span | None, outcome: str, code: str, *, prompt_tokens: int, generated_tokens: int,
                    finish_reason: str, e2e_s: float, queue_s: float | None,
                    time_per_output_token_s: float | None) -> None:
        """A request that was admitted has ended; ``queue_s`` None: it never left the queue."""
        self.requests.add(1, {"outcome": outcome, "code": code})
        self.e2e_request_latency.record(e2e_s)
        if queue_s is not None:
            self.request_queue_time.record(queue_s)
        if time_per_output_token_s is not None:
            self.time_per_output_token.record(time_per_output_token_s)
        self.vllm.request_finished(finish_reason, outcome, prompt_tokens=prompt_tokens,
                                   generated_tokens=generated_tokens, e2e_s=e2e_s, queue_s=queue_s,
                                   time_per_output_token_s=time_per_output_token_s)
        if span is not None and span.is_recording():
            span.set_attributes({"specfleet.generated_tokens": generated_tokens,
                                 "specfleet.finish_reason": finish_reason, "specfleet.outcome": outcome,
                                 "rpc.grpc.status_code": grpc.StatusCode[code].value[0]})
            if outcome in ("error", "deadline"):
                span.set_status(Status(StatusCode.ERROR, code))
            span.end()

    def request_rejected(self, code: str, message: str, metadata: Any = ()) -> None:
        self.requests.add(1, {"outcome": "error", "code": code})
        if self.tracing:
            span = self.tracer.start_span("request", context=propagate.extract(_carrier(metadata)),
                                          kind=SpanKind.SERVER, attributes={"specfleet.outcome": "error"})
            span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"))
            span.end()

    # -- steps ------------------------------------------------------------------------------------------------------

    def step_span(self, target: str, request_spans: Iterable[Span]) -> contextlib.AbstractContextManager[Span]:
        """The current span while a step runs: a trace of its own, linked to the request spans of its batch."""
        if not self.tracing:
            return contextlib.nullcontext(INVALID_SPAN)
        contexts = (span.get_span_context() for span in request_spans if span is not None)
        links = [Link(context) for context in contexts if context.is_valid]
        return self.tracer.start_as_current_span("step", context=trace.set_span_in_context(INVALID_SPAN),
                                                 kind=SpanKind.INTERNAL, links=links,
                                                 attributes={"specfleet.target": target})

    def annotate_step(self, span: Span, stats: StepStats) -> None:
        if span.is_recording():
            span.set_attributes({
                "specfleet.batch_size": stats.batch_size, "specfleet.depth.max": max(stats.planned, default=0),
                "specfleet.depth.mean": sum(stats.planned) / max(1, len(stats.planned)),
                "specfleet.drafted_tokens": stats.acceptance.drafted,
                "specfleet.accepted_tokens": stats.acceptance.accepted, "specfleet.emitted_tokens": stats.emitted,
                "specfleet.plan.reason": stats.reason})

    def record_step(self, stats: StepStats) -> None:
        """A few instrument calls per sequence (depth, accepted) and per draft position, a few per step."""
        depth_label = {"depth": str(max(stats.planned, default=0))}
        self.step_batch_size.record(stats.batch_size)
        for depth in stats.planned:
            self.speculation_depth.record(depth)
        for accepted in stats.accepted:
            self.accepted_tokens_per_step.record(accepted)
        for seconds in stats.first_token_s:
            self.time_to_first_token.record(seconds)
        acceptance = stats.acceptance
        drafted = acceptance.drafted
        if drafted:
            self.draft_tokens.add(drafted)
            self.accepted_tokens.add(acceptance.accepted)
            for position, count in enumerate(acceptance.proposed_by_position):
                self.draft_position_proposed.add(count, {"position": str(position)})
            for position, count in enumerate(acceptance.accepted_by_position):
                self.draft_position_accepted.add(count, {"position": str(position)})
        self.generated_tokens.add(stats.emitted)
        self.step_emitted_tokens.add(stats.emitted, depth_label)
        self.step_duration.add(stats.duration_s, depth_label)
        self.vllm.record_step(stats)

    def record_draft_rtt(self, replica: str, seconds: float) -> None:
        self.draft_latency.record(seconds, {"replica": replica})

    def record_verify_rtt(self, replica: str, seconds: float) -> None:
        self.verify_latency.record(seconds, {"replica": replica})

    def record_reprefills(self, role: str, sequences: int) -> None:
        self.reprefills.add(sequences, {"role": role})

    def record_drafts_ahead(self, used: bool) -> None:
        self.drafts_ahead.add(1, {"outcome": "used" if used else "dropped"})

    def record_canary(self, matched: bool, request_id: str, first_difference: int | None) -> None:
        self.canary_replays.add(1)
        if matched:
            return
        self.canary_mismatches.add(1)
        if self.tracing:
            span = self.tracer.start_span("canary mismatch", attributes={
                "specfleet.request_id": request_id, "specfleet.first_difference": first_difference or 0})
            span.set_status(Status(StatusCode.ERROR, "a greedy answer differs from plain decoding"))
            span.end()


class ServiceMetrics:
    """A draft or target service's metrics: the compute time of each batch, the sequences it holds, and the prompt
    tokens it was sent against those it started from cached prefixes (the prefix cache's hit rate).

    As Prometheus shows them: specfleet_service_batch_latency_seconds{role} (histogram),
    specfleet_service_live_sequences{role} (gauge), specfleet_service_prompt_tokens_total{role} and
    specfleet_service_reused_prompt_tokens_total{role} (counters), role draft or target.
    """

    def __init__(self, otel: Otel | None, role: str, live_sequences: Callable[[], int],
                 reused_prompt_tokens: Callable[[], int] = lambda: 0) -> None:
        meter = (otel or Otel()).meter
        self._role = {"role": role}
        self.batch_latency = _histogram(
            meter, "specfleet_service_batch_latency", "s", "compute time of one Propose or Verify batch, by role")
        meter.create_observable_gauge("specfleet_service_live_sequences", [_gauge(live_sequences, self._role)],
                                      "{sequence}", "sequences held in the service's cache, by role")
        self.prompt_tokens = meter.create_counter(
            "specfleet_service_prompt_tokens", "{token}",
            "tokens of the sequences sent whole (new requests, and sequences resent after a lost cache), by role")
        meter.create_observable_counter(
            "specfleet_service_reused_prompt_tokens", [_gauge(reused_prompt_tokens, self._role)], "{token}",
            "of the tokens of sequences sent whole, those started from a cached prefix instead of computed, by role")

    def record_batch(self, seconds: float) -> None:
        self.batch_latency.record(seconds, self._role)

    def record_prompts(self, tokens: int) -> None:
        """Tokens of sequences a batch sent whole (rolled back to 0)."""
        if tokens:
            self.prompt_tokens.add(tokens, self._role)


# ---------------------------------------------------------------------------------------------------------------------
# trace context over gRPC


def _carrier(metadata: Any) -> dict[str, Any]:
    return dict(metadata or ())


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


class ClientTracing(grpc.aio.UnaryUnaryClientInterceptor):
    """A client span around each unary call made inside a trace, with the trace context in the call's metadata.

    The interceptor returns the call as soon as it is started and ends the span from the call's done callback; it
    never awaits the call itself. Awaiting it here (as opentelemetry-instrumentation-grpc's aio client interceptor
    does) keeps the caller's cancellation from reaching the call and the server (opentelemetry-python-contrib #3271).
    Calls made outside any trace (start-up GetInfo, background Release) pass through untouched.
    """

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self._closing: set[asyncio.Task] = set()

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        if not trace.get_current_span().get_span_context().is_valid:
            return await continuation(client_call_details, request)
        method = client_call_details.method
        method = (method.decode() if isinstance(method, bytes) else method).lstrip("/")
        span = self.tracer.start_span(method, kind=SpanKind.CLIENT, attributes=_rpc_attributes(method))
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), *carrier.items())
        try:
            call = await continuation(client_call_details._replace(metadata=metadata), request)
        except BaseException as err:
            span.set_status(Status(StatusCode.ERROR, repr(err)))
            span.end()
            raise
        call.add_done_callback(self._on_done(span))
        return call

    def _on_done(self, span: Span) -> Callable[[Any], None]:
        def done(call: Any) -> None:  # the status is there already; reading it is a coroutine
            task = asyncio.get_running_loop().create_task(_end_rpc_span(span, call))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

        return done


async def _end_rpc_span(span: Span, call: Any) -> None:
    try:
        code = grpc.StatusCode.CANCELLED if call.cancelled() else await call.code()
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


class ServerTracing(grpc.aio.ServerInterceptor):
    """A server span, the child of the caller's span, around each unary call that arrives with trace context.

    Calls without it (health probes, reflection, start-up GetInfo, background Release) get no span.
    """

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        parent = propagate.extract(_carrier(handler_call_details.invocation_metadata))
        if not trace.get_current_span(parent).get_span_context().is_valid:
            return handler
        method = handler_call_details.method.lstrip("/")
        behaviour, tracer = handler.unary_unary, self.tracer

        async def traced(request, context):
            with tracer.start_as_current_span(method, context=parent, kind=SpanKind.SERVER,
                                              attributes=_rpc_attributes(method), record_exception=False,
                                              set_status_on_exception=False) as span:
                code = None
                try:
                    return await behaviour(request, context)
                except asyncio.CancelledError:  # the caller cancelled, or its deadline passed
                    remaining = context.time_remaining()
                    expired = remaining is not None and remaining <= 0
                    code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                    raise
                except BaseException:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    code = code or context.code() or grpc.StatusCode.OK
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code != grpc.StatusCode.OK:
                        span.set_status(Status(StatusCode.ERROR, code.name))

        return grpc.unary_unary_rpc_method_handler(traced, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

