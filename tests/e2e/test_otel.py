"""OpenTelemetry: the metric names Prometheus scrapes (the dashboards are written against them), spans from all three
services over OTLP with their parent/child links, and cancellation still reaching the services through the tracing
interceptors. The deployment here runs a tiny random Llama with a tokenizer trained in the test: no real model."""

from __future__ import annotations

import asyncio
import secrets
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from dashboards import VLLM_FAMILIES
from live_sequences import live_sequences, wait_live
from prometheus_client.parser import text_string_to_metric_families

from specfleet.client import make_request, stream
from specfleet.launcher import Deployment, free_port, wait_serving
from specfleet.otel import SECONDS_BUCKETS, ClientTracing, RouterMetrics, ServerTracing, ServiceMetrics, setup
from specfleet.protos import draft_pb2_grpc, generate_pb2, generate_pb2_grpc, target_pb2_grpc
from specfleet.stats import SequenceStep, StepStats

COUNTERS = {
    "specfleet_requests_total", "specfleet_prompt_tokens_total", "specfleet_generated_tokens_total",
    "specfleet_draft_tokens_total",
    "specfleet_accepted_tokens_total", "specfleet_draft_position_proposed_total",
    "specfleet_draft_position_accepted_total", "specfleet_step_emitted_tokens_total",
    "specfleet_step_duration_seconds_total", "specfleet_reprefills_total", "specfleet_canary_replays_total",
    "specfleet_canary_mismatches_total", "specfleet_drafts_ahead_total", "specfleet_service_prompt_tokens_total",
    "specfleet_service_reused_prompt_tokens_total",
}
GAUGES = {"specfleet_queue_depth", "specfleet_live_requests", "specfleet_slot_usage", "specfleet_redis_up",
          "specfleet_service_live_sequences"}
HISTOGRAMS = {
    "specfleet_time_to_first_token_seconds", "specfleet_time_per_output_token_seconds",
    "specfleet_e2e_request_latency_seconds", "specfleet_request_queue_time_seconds", "specfleet_step_batch_size",
    "specfleet_speculation_depth", "specfleet_accepted_tokens_per_step", "specfleet_draft_latency_seconds",
    "specfleet_verify_latency_seconds", "specfleet_service_batch_latency_seconds",
}
LABELS = {
    "specfleet_requests_total": {"outcome", "code"}, "specfleet_draft_position_proposed_total": {"position"},
    "specfleet_draft_position_accepted_total": {"position"}, "specfleet_step_emitted_tokens_total": {"depth"},
    "specfleet_step_duration_seconds_total": {"depth"}, "specfleet_draft_latency_seconds_bucket": {"replica", "le"},
    "specfleet_verify_latency_seconds_bucket": {"replica", "le"}, "specfleet_reprefills_total": {"role"},
    "specfleet_drafts_ahead_total": {"outcome"},
    "specfleet_service_batch_latency_seconds_bucket": {"role", "le"}, "specfleet_service_live_sequences": {"role"},
    "specfleet_service_prompt_tokens_total": {"role"}, "specfleet_service_reused_prompt_tokens_total": {"role"},
}


def scrape(port: int) -> dict[str, list[Any]]:
    """The endpoint's samples by name, as (family type, sample) pairs."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((family.type, sample))
    return samples


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(s.value for _, s in samples.get(name, []) if labels.items() <= s.labels.items())


# ---------------------------------------------------------------------------------------------------------------------
# metric names, as Prometheus scrapes them


def serving_one_step(otel: Any, model_name: str) -> RouterMetrics:
    """Router metrics serving ``model_name`` (3 queued, 2 live, a quarter of the slots) after one step of two
    sequences (one drafted 3 and had 2 accepted) and one request that ended well (7 prompt tokens, 4 generated)."""
    router = RouterMetrics(otel)
    router.serve(model_name, queue_depth=lambda: 3, live_requests=lambda: 2, slot_usage=lambda: 0.25,
                 redis_up=lambda: True)
    stats = StepStats("target-0:50052", batch_size=2, planned=[3, 0], deepest=3, first_token_s=[0.05],
                      inter_token_s=[0.02], duration_s=0.02)
    stats.observe(SequenceStep(3, drafted=3, accepted=2, first_rejected=1, emitted=3))
    stats.observe(SequenceStep(0, emitted=1))
    router.record_step(stats)
    router.end_request(router.start_request("r1", 7), "ok", "OK", prompt_tokens=7, generated_tokens=4,
                       finish_reason="eos", e2e_s=0.4, queue_s=0.1, time_per_output_token_s=0.01)
    return router


def test_every_metric_is_scraped_with_its_name_type_labels_and_buckets() -> None:
    otel = setup("router", "127.0.0.1", free_port())
    try:
        router = serving_one_step(otel, "tiny")
        router.record_draft_rtt("draft-0:50051", 0.003)
        router.record_verify_rtt("target-0:50052", 0.012)
        router.record_reprefills("target", 1)
        router.request_rejected("INVALID_ARGUMENT", "prompt is empty")
        # One process serves one role: a second role's observed instruments (its gauge, the reused tokens) are not
        # registered again, so those are read for the draft only.
        draft = ServiceMetrics(otel, "draft", lambda: 2, reused_prompt_tokens=lambda: 24)
        draft.record_batch(0.002)
        draft.record_prompts(30)
        target = ServiceMetrics(otel, "target", lambda: 1)
        target.record_batch(0.02)
        target.record_prompts(40)
        samples = scrape(otel.metrics_port)
    finally:
        otel.shutdown()

    for name in COUNTERS:
        assert {t for t, _ in samples[name]} == {"counter"}, name
    for name in GAUGES:
        assert {t for t, _ in samples[name]} == {"gauge"}, name
    for name in HISTOGRAMS:
        for suffix in ("bucket", "sum", "count"):
            assert {t for t, _ in samples[f"{name}_{suffix}"]} == {"histogram"}, f"{name}_{suffix}"
    exported = {name for name in samples if name.startswith("specfleet_")}
    assert exported == COUNTERS | GAUGES | {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}
    for name, labels in LABELS.items():
        for _, sample in samples[name]:
            assert set(sample.labels) == labels, (name, sample.labels)

    # the names the chart's dashboards are checked against (tests/deploy/test_helm.py) are exactly these
    from dashboards import COUNTERS_AND_GAUGES
    from dashboards import HISTOGRAMS as DASHBOARD_HISTOGRAMS

    assert COUNTERS | GAUGES == COUNTERS_AND_GAUGES and HISTOGRAMS == DASHBOARD_HISTOGRAMS

    def bounds(name: str) -> list[float]:
        return sorted({float(s.labels["le"]) for _, s in samples[f"{name}_bucket"]})

    assert bounds("specfleet_time_to_first_token_seconds") == [*SECONDS_BUCKETS, float("inf")]
    assert bounds("specfleet_service_batch_latency_seconds") == [*SECONDS_BUCKETS, float("inf")]
    assert bounds("specfleet_speculation_depth") == [*range(17), float("inf")]
    assert bounds("specfleet_step_batch_size") == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, float("inf")]
    assert value(samples, "specfleet_requests_total", outcome="error", code="INVALID_ARGUMENT") == 1
    assert value(samples, "specfleet_draft_position_accepted_total", position="1") == 1
    assert value(samples, "specfleet_draft_position_accepted_total", position="2") == 0
    assert value(samples, "specfleet_step_emitted_tokens_total", depth="3") == 4
    assert value(samples, "specfleet_speculation_depth_count") == 2
    assert value(samples, "specfleet_accepted_tokens_per_step_count") == 1  # only the sequence that drafted
    assert value(samples, "specfleet_service_live_sequences", role="draft") == 2
    assert value(samples, "specfleet_service_prompt_tokens_total", role="draft") == 30
    assert value(samples, "specfleet_service_prompt_tokens_total", role="target") == 40
    assert value(samples, "specfleet_service_reused_prompt_tokens_total", role="draft") == 24
    assert value(samples, "specfleet_redis_up") == 1


def families(port: int) -> dict[str, Any]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_vllm_names_beside_ours_with_the_model_name() -> None:
    """The tools built on vLLM's metrics (KEDA recipes, the inference gateway's endpoint picker, dashboards) find
    them by name, type and model_name label, counting what ours count."""
    otel = setup("router", "127.0.0.1", free_port())
    try:
        router = serving_one_step(otel, "tiny-model")
        router.end_request(router.start_request("r2", 5), "aborted", "CANCELLED", prompt_tokens=5,
                           generated_tokens=0, finish_reason="unspecified", e2e_s=0.2, queue_s=None,
                           time_per_output_token_s=None)
        found = families(otel.metrics_port)
        samples = scrape(otel.metrics_port)
        # what a Prometheus asks for: OpenMetrics first; the answer must keep the colons in the sample lines
        asking = urllib.request.Request(f"http://127.0.0.1:{otel.metrics_port}/metrics", headers={
            "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
        negotiated = urllib.request.urlopen(asking, timeout=10).read().decode()
    finally:
        otel.shutdown()

    assert 'vllm:num_requests_waiting{model_name="tiny-model"} 3.0' in negotiated.splitlines()
    vllm = {name: family for name, family in found.items() if name.startswith("vllm:")}
    assert {name: family.type for name, family in vllm.items()} == VLLM_FAMILIES
    for family in vllm.values():
        assert family.samples and all(s.labels["model_name"] == "tiny-model" for s in family.samples), family.name
        assert not any(s.name.endswith("_created") for s in family.samples), family.name
    assert value(samples, "vllm:num_requests_waiting") == 3 and value(samples, "vllm:num_requests_running") == 2
    assert value(samples, "vllm:kv_cache_usage_perc") == 0.25 == value(samples, "specfleet_slot_usage")
    assert value(samples, "vllm:prompt_tokens_total") == 12 == value(samples, "specfleet_prompt_tokens_total")
    assert value(samples, "vllm:generation_tokens_total") == 4 == value(samples, "specfleet_generated_tokens_total")
    assert value(samples, "vllm:request_success_total", finished_reason="stop") == 1
    assert value(samples, "vllm:request_success_total", finished_reason="abort") == 1
    assert value(samples, "vllm:e2e_request_latency_seconds_count") == 2
    assert value(samples, "vllm:request_queue_time_seconds_count") == 1  # r2 never left the queue
    assert value(samples, "vllm:inter_token_latency_seconds_sum") == pytest.approx(0.02)
    assert value(samples, "vllm:spec_decode_num_drafts_total") == 1
    assert value(samples, "vllm:spec_decode_num_draft_tokens_total") == 3 == value(samples,
                                                                                   "specfleet_draft_tokens_total")
    assert value(samples, "vllm:spec_decode_num_accepted_tokens_total") == 2
    per_position = {s.labels["position"]: s.value
                    for _, s in samples["vllm:spec_decode_num_accepted_tokens_per_pos_total"]}
    assert per_position == {"0": 1, "1": 1, "2": 0}


def test_reprefill_counters_start_at_zero() -> None:
    """A fleet that never re-prefills shows 0 per role (the dashboards' panel), not a missing series."""
    otel = setup("router", "127.0.0.1", free_port())
    try:
        RouterMetrics(otel)
        samples = scrape(otel.metrics_port)
    finally:
        otel.shutdown()
    assert {s.labels["role"]: s.value for _, s in samples["specfleet_reprefills_total"]} == {"draft": 0, "target": 0}


def test_without_an_endpoint_nothing_is_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                     "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"):
        monkeypatch.delenv(variable, raising=False)
    otel = setup("draft")
    assert not otel.tracing and otel.metrics_port == 0 and otel.client_interceptors() == []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    assert not setup("draft").tracing


def test_otlp_over_http_posts_spans_and_metrics_to_the_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf: protobuf POSTs to <endpoint>/v1/traces and /v1/metrics."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: dict[str, list[bytes]] = {}

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            assert self.headers["Content-Type"] == "application/x-protobuf"
            received.setdefault(self.path, []).append(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
        otel = setup("router")
        otel.tracer.start_span("a step").end()
        RouterMetrics(otel).record_reprefills("target", 1)
        otel.shutdown()  # flushes both
    finally:
        collector.shutdown()
    spans = ExportTraceServiceRequest.FromString(received["/v1/traces"][0])
    assert [s.name for rs in spans.resource_spans for ss in rs.scope_spans for s in ss.spans] == ["a step"]
    metrics = ExportMetricsServiceRequest.FromString(received["/v1/metrics"][-1])
    names = {m.name for rm in metrics.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert "specfleet_reprefills" in names


# ---------------------------------------------------------------------------------------------------------------------
# the tracing interceptors let a caller's cancellation through (opentelemetry-python-contrib #3271)


def test_cancelling_a_traced_call_cancels_it_on_the_server() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("test")

    class SlowHealth(health_pb2_grpc.HealthServicer):
        def __init__(self) -> None:
            self.started, self.cancelled = asyncio.Event(), asyncio.Event()

        async def Check(self, request, context):
            self.started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return health_pb2.HealthCheckResponse()

    async def scenario() -> None:
        servicer = SlowHealth()
        server = grpc.aio.server(interceptors=[ServerTracing(tracer)])
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=[ClientTracing(tracer)]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def check() -> None:  # as the router's step awaits Propose/Verify
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=60)

            with tracer.start_as_current_span("step"):
                call = asyncio.get_running_loop().create_task(check())
                await asyncio.wait_for(servicer.started.wait(), 10)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
            await asyncio.wait_for(servicer.cancelled.wait(), 10)  # the server saw the cancellation
            await asyncio.sleep(0.1)  # the client span ends from the call's done callback
        await server.stop(0)

    asyncio.run(scenario())
    by_name = {(s.name, s.kind.name): s for s in spans.get_finished_spans()}
    step = by_name[("step", "INTERNAL")]
    client = by_name[("grpc.health.v1.Health/Check", "CLIENT")]
    server = by_name[("grpc.health.v1.Health/Check", "SERVER")]
    assert client.parent.span_id == step.context.span_id and server.parent.span_id == client.context.span_id
    assert server.context.trace_id == client.context.trace_id == step.context.trace_id
    assert client.status.description == server.status.description == "CANCELLED"


# ---------------------------------------------------------------------------------------------------------------------
# real processes: a tiny target, an ngram draft and a router, exporting to a test OTLP receiver


PROPOSE, VERIFY = "specfleet.v1.DraftService/Propose", "specfleet.v1.TargetService/Verify"


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    resource: dict[str, str]
    span: Any  # opentelemetry.proto.trace.v1.trace_pb2.Span


def attributes(span: Any) -> dict[str, Any]:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


class Receiver:
    """An OTLP/gRPC endpoint that keeps what it is sent: spans, and metric names by service."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.spans: list[ReceivedSpan] = []
        self.metrics: set[tuple[str, str]] = set()
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                for resource_spans in request.resource_spans:
                    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    receiver.spans.extend(ReceivedSpan(resource["service.name"], resource, span)
                                          for scope in resource_spans.scope_spans for span in scope.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):
                for resource_metrics in request.resource_metrics:
                    service = next(a.value.string_value for a in resource_metrics.resource.attributes
                                   if a.key == "service.name")
                    receiver.metrics.update((service, m.name) for scope in resource_metrics.scope_metrics
                                            for m in scope.metrics)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def wait(self, found: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while not (result := found()):
            assert time.monotonic() < deadline, "not received in time"
            time.sleep(0.1)
        return result


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama and a byte-level BPE tokenizer trained here (no download, no cache)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-target")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog; def fib(n): return n"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class Fleet:
    receiver: Receiver
    router: str
    draft: str
    target: str
    metrics_ports: dict[str, int]


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    receiver = Receiver()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_TRACES_EXPORTER": "otlp",
           "OTEL_METRICS_EXPORTER": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "500",
           "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test", "OMP_NUM_THREADS": "1"}
    ports = {role: free_port() for role in ("router", "draft", "target", "router-metrics", "draft-metrics",
                                            "target-metrics")}
    addresses = {role: f"127.0.0.1:{ports[role]}" for role in ("router", "draft", "target")}

    def start(role: str, args: list[str]) -> None:
        argv = [sys.executable, "-m", "specfleet.cli", role, "--port", str(ports[role]), "--metrics-port",
                str(ports[f"{role}-metrics"]), *args]
        wait_serving(deployment.start(role, argv, env), addresses[role], timeout_s=120)

    try:
        with Deployment(tmp_path_factory.mktemp("otel-logs")) as deployment:
            start("target", ["--model", str(tiny_model), "--device", "cpu", "--num-slots", "4",
                             "--max-seq-len", "2048"])
            start("draft", ["--drafter", "ngram"])
            start("router", ["--targets", addresses["target"], "--drafts", addresses["draft"], "--depth", "2"])
            yield Fleet(receiver, addresses["router"], addresses["draft"], addresses["target"],
                        {role: ports[f"{role}-metrics"] for role in ("router", "draft", "target")})
    finally:
        receiver.server.stop(0)


def test_spans_from_all_three_services_link_up(fleet: Fleet) -> None:
    caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    with grpc.insecure_channel(fleet.router) as channel:
        response = generate_pb2_grpc.GenerationServiceStub(channel).Generate(
            make_request("def fib(n): return n", request_id="traced", max_new_tokens=8, ignore_eos=True),
            metadata=[("traceparent", f"00-{caller_trace}-{caller_span}-01")], timeout=60)
    assert len(response.token_ids) == 8
    receiver = fleet.receiver

    def request_span() -> Any:
        return next((r.span for r in receiver.spans if r.service == "specfleet-router" and r.span.name == "request"
                     and attributes(r.span).get("specfleet.request_id") == "traced"), None)

    request = receiver.wait(request_span)
    assert request.trace_id.hex() == caller_trace and request.parent_span_id.hex() == caller_span
    assert request.kind == request.SPAN_KIND_SERVER
    assert attributes(request)["specfleet.generated_tokens"] == 8
    assert attributes(request)["specfleet.finish_reason"] == "length"
    assert attributes(request)["specfleet.prompt_tokens"] > 0

    def steps() -> list[Any]:
        return [r.span for r in receiver.spans if r.service == "specfleet-router" and r.span.name == "step"
                and any(link.span_id == request.span_id and link.trace_id == request.trace_id
                        for link in r.span.links)]

    # every step of the request, with its calls' client and server spans, has arrived
    def complete() -> list[Any]:
        found = steps()
        total = sum(attributes(s)["specfleet.emitted_tokens"] for s in found)
        return found if total == 8 and all(len(calls(s)) == expected_calls(s) for s in found) else []

    def calls(step: Any) -> list[tuple[Any, ReceivedSpan]]:
        """(client span, server span) pairs of the step's Propose/Verify calls."""
        clients = [r.span for r in receiver.spans if r.span.parent_span_id == step.span_id]
        return [(client, server) for client in clients for server in receiver.spans
                if server.span.parent_span_id == client.span_id]

    def expected_calls(step: Any) -> int:
        return 1 + (attributes(step)["specfleet.depth.max"] > 0)  # Verify, and Propose when it drafts

    found = receiver.wait(complete)
    assert any(attributes(s)["specfleet.depth.max"] == 2 for s in found)
    for step in found:
        assert not step.parent_span_id and step.trace_id != request.trace_id  # a trace of its own, linked
        assert attributes(step)["specfleet.batch_size"] == 1
        assert attributes(step)["specfleet.plan.reason"].startswith("pinned depth")  # why: the policy's line
        methods = []
        for client, server in calls(step):
            methods.append(client.name)
            assert client.kind == client.SPAN_KIND_CLIENT and server.span.kind == server.span.SPAN_KIND_SERVER
            assert client.trace_id == server.span.trace_id == step.trace_id
            assert server.span.name == client.name
            assert server.service == ("specfleet-draft" if "Propose" in client.name else "specfleet-target")
            assert server.resource["deployment.environment"] == "test"
        drafted = attributes(step)["specfleet.depth.max"] > 0
        assert sorted(methods) == ([PROPOSE, VERIFY] if drafted else [VERIFY])

    # metrics arrive over OTLP too, from all three
    receiver.wait(lambda: {("specfleet-router", "specfleet_requests"),
                           ("specfleet-draft", "specfleet_service_batch_latency"),
                           ("specfleet-target", "specfleet_service_batch_latency")} <= receiver.metrics)


def test_cancel_and_deadline_release_the_sequences_through_the_interceptors(fleet: Fleet) -> None:
    long_request = make_request("the quick brown fox", max_new_tokens=2000, ignore_eos=True)
    with grpc.insecure_channel(fleet.router) as channel:
        call = generate_pb2_grpc.GenerationServiceStub(channel).GenerateStream(long_request, timeout=120)
        next(call)
        next(call)
        assert live_sequences(fleet.target, target_pb2_grpc.TargetServiceStub) == 1
        call.cancel()
    assert wait_live(fleet.target, target_pb2_grpc.TargetServiceStub, 0) == 0
    assert wait_live(fleet.draft, draft_pb2_grpc.DraftServiceStub, 0) == 0

    with pytest.raises(grpc.RpcError) as caught:
        list(stream(fleet.router, long_request, timeout_s=0.3))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_live(fleet.target, target_pb2_grpc.TargetServiceStub, 0) == 0
    assert wait_live(fleet.draft, draft_pb2_grpc.DraftServiceStub, 0) == 0

    router = scrape(fleet.metrics_ports["router"])
    assert value(router, "vllm:request_success_total", finished_reason="abort") == 2
    assert value(router, "specfleet_requests_total", outcome="aborted", code="CANCELLED") == 1
    assert value(router, "specfleet_requests_total", outcome="deadline", code="DEADLINE_EXCEEDED") == 1
    assert value(router, "specfleet_live_requests") == 0
    assert value(router, "specfleet_verify_latency_seconds_count", replica=fleet.target) > 0
    for role in ("draft", "target"):
        service = scrape(fleet.metrics_ports[role])
        assert value(service, "specfleet_service_live_sequences", role=role) == 0
        assert value(service, "specfleet_service_batch_latency_seconds_count", role=role) > 0
        assert value(service, "specfleet_service_prompt_tokens_total", role=role) > 0


def test_a_prompt_sent_again_is_counted_as_reused_by_the_target(fleet: Fleet) -> None:
    def counts() -> tuple[float, float]:
        target = scrape(fleet.metrics_ports["target"])
        return (value(target, "specfleet_service_prompt_tokens_total", role="target"),
                value(target, "specfleet_service_reused_prompt_tokens_total", role="target"))

    request = make_request("a prompt sent twice: the second time, the target starts from what it kept",
                           max_new_tokens=2, ignore_eos=True)
    list(stream(fleet.router, request))
    sent, reused = counts()
    list(stream(fleet.router, request))
    sent_again, reused_again = counts()
    prompt = sent_again - sent
    assert prompt > 0 and reused_again - reused == prompt - 1  # all but the last token, whose logits it computes



def test_the_router_serves_vllm_names_for_its_model(fleet: Fleet) -> None:
    """From a real router: vLLM's counters agree with ours, labelled with the model the OpenAI API serves."""
    for _ in range(2):
        list(stream(fleet.router, make_request("def fib(n): return n", max_new_tokens=12, ignore_eos=True)))
    with grpc.insecure_channel(fleet.router) as channel:
        served = generate_pb2_grpc.GenerationServiceStub(channel).GetServerInfo(
            generate_pb2.GetServerInfoRequest(), timeout=10).model
    router = scrape(fleet.metrics_ports["router"])
    models = {s.labels["model_name"] for name, found in router.items() if name.startswith("vllm:") for _, s in found}
    assert models == {served}
    for ours, theirs in (("specfleet_generated_tokens_total", "vllm:generation_tokens_total"),
                         ("specfleet_prompt_tokens_total", "vllm:prompt_tokens_total"),
                         ("specfleet_draft_tokens_total", "vllm:spec_decode_num_draft_tokens_total"),
                         ("specfleet_accepted_tokens_total", "vllm:spec_decode_num_accepted_tokens_total"),
                         ("specfleet_e2e_request_latency_seconds_count", "vllm:e2e_request_latency_seconds_count")):
        assert value(router, ours) == value(router, theirs) > 0, (ours, theirs)
    assert value(router, "vllm:spec_decode_num_draft_tokens_total") > 0  # the ngram drafter drafted (depth 2)
    assert value(router, "vllm:request_success_total", finished_reason="length") >= 2
    assert value(router, "vllm:num_requests_running") == 0 == value(router, "vllm:kv_cache_usage_perc")
