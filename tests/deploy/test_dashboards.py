"""Every Grafana dashboard query returns data from a real deployment under load, scraped by a real Prometheus.

redis-server, a target on the real SmolLM2, an ngram draft and a router with ``--depth auto`` run as processes, each
serving /metrics on a loopback port. Prometheus (Debian's ``prometheus`` package, which .ci/run installs) scrapes them
every second with the labels a ServiceMonitor scrape in the chart's namespace would give. Mixed traffic goes to the
router (greedy and sampled, unary and streamed, bad input, a cancelled, an aborted and a timed-out request); then
each panel query of each dashboard, with Grafana's variables filled in as Grafana would, must return at least one
finite value. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from dashboards import ADAPTER_VALUES, DASHBOARDS, fill_in, panels
from helm_tools import NAMESPACE, RELEASE

from specfleet.client import make_request
from specfleet.launcher import Deployment, Process, free_port, wait_redis, wait_serving
from specfleet.protos import generate_pb2, generate_pb2_grpc

pytestmark = pytest.mark.real_model

ROLES = ("router", "draft", "target")
SCRAPE_INTERVAL_S = 1
# Grafana's built-in variables as a Grafana with the data source's default scrape interval (15 s) sets them for a
# dashboard's usual time range: $__rate_interval = max($__interval + 15s, 4 x 15s) = 1m. At our 1 s scrape a 1m
# window holds ~60 samples and covers the whole load, which ends seconds before the queries are evaluated.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__range_s": "3600"}
DASHBOARD_FILES = {path.name: path for path in DASHBOARDS}
PROMETHEUS_HOWTO = ("the prometheus server binary is not on PATH: `apt-get install -y --no-install-recommends "
                    "prometheus` (Debian's package ships /usr/bin/prometheus and promtool; .ci/run installs it)")


# ---------------------------------------------------------------------------------------------------------------------
# the dashboards' queries


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # file name
    panel_id: int
    panel: str  # title
    ref_id: str
    expr: str  # as written in the dashboard, Grafana variables and all

    def describe(self) -> str:
        return f"{self.dashboard}, panel {self.panel_id} {self.panel!r} (query {self.ref_id}): {self.expr}"


def dashboard_queries() -> list[PanelQuery]:
    found = []
    for path in DASHBOARDS:
        for panel in panels(json.loads(path.read_text())):
            found += [PanelQuery(path.name, panel["id"], panel["title"], target.get("refId", "?"), target["expr"])
                      for target in panel.get("targets", [])]
    return found


def dashboard_variables(dashboard: str) -> list[dict[str, Any]]:
    """The dashboard's template variables that end up in queries (the data source variable does not)."""
    variables = json.loads(DASHBOARD_FILES[dashboard].read_text())["templating"]["list"]
    return [v for v in variables if v["type"] != "datasource"]


# ---------------------------------------------------------------------------------------------------------------------
# Prometheus


def prometheus_binary() -> str:
    """The server binary; missing, the test skips on a developer's machine and fails in CI."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(PROMETHEUS_HOWTO, pytrace=False)
        pytest.skip(PROMETHEUS_HOWTO)
    return binary


def scrape_config(metrics_ports: dict[str, int]) -> dict[str, Any]:
    """One job per service, labelled as the chart's ServiceMonitor labels a scrape in a cluster.

    There the Prometheus Operator sets ``job`` and ``service`` to the Kubernetes Service's name, ``namespace``, ``pod``,
    ``container`` and ``endpoint`` (the port's name) from service discovery, and the ServiceMonitor's relabeling adds
    ``component``. Here the same labels are static; ``instance`` is the loopback address instead of the pod's.
    """
    jobs = []
    for role, port in metrics_ports.items():
        service = f"{RELEASE}-specfleet-{role}"
        jobs.append({"job_name": service, "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": {
            "namespace": NAMESPACE, "service": service, "pod": f"{service}-0", "container": role,
            "endpoint": "metrics", "component": role}}]})
    interval = f"{SCRAPE_INTERVAL_S}s"
    return {"global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "scrape_configs": jobs}


class Prometheus:
    """The HTTP API of a Prometheus on loopback."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def query(self, promql: str, at: float) -> list[dict[str, Any]]:
        """An instant query at unix time ``at``: the result vector (a scalar comes back as one sample)."""
        data = self.get("/api/v1/query", query=promql, time=f"{at:.3f}")
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def label_values(self, label: str, match: str, start: float, end: float) -> list[str]:
        return self.get(f"/api/v1/label/{label}/values", **{"match[]": match, "start": start, "end": end})


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float, process: Process | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if process is not None and process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited with code {process.popen.returncode}\n{process.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f} s" + (f"\n{process.log_tail()}" if process else ""))
        time.sleep(0.2)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# load


REPETITIVE = "red green blue, red green blue, red green blue, red green blue,"  # the ngram drafter predicts this well
PROMPTS = [REPETITIVE, "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):",
           "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "The capital of France is Paris. The capital of Italy is"]
NEW_TOKENS = 16  # enough for several steps per request, few enough for a busy two-core machine
LONG = 400  # tokens asked by the requests that are cancelled, aborted or time out long before they finish


def generate(stub: generate_pb2_grpc.GenerationServiceStub, request: generate_pb2.GenerateRequest) -> str:
    response = stub.Generate(request, timeout=120)
    assert len(response.token_ids) > 0
    return "ok"


def generate_stream(stub: generate_pb2_grpc.GenerationServiceStub, request: generate_pb2.GenerateRequest) -> str:
    messages = list(stub.GenerateStream(request, timeout=120))
    assert messages[-1].finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
    return "ok"


def rejected(stub: generate_pb2_grpc.GenerationServiceStub, request: generate_pb2.GenerateRequest) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    return "rejected"


def cancelled(stub: generate_pb2_grpc.GenerationServiceStub) -> str:
    call = stub.GenerateStream(make_request(REPETITIVE, max_new_tokens=LONG, ignore_eos=True), timeout=120)
    next(call)
    next(call)
    call.cancel()
    return "cancelled"


def aborted(stub: generate_pb2_grpc.GenerationServiceStub) -> str:
    request = make_request(PROMPTS[2], request_id="to-abort", max_new_tokens=LONG, ignore_eos=True)
    call = stub.GenerateStream(request, timeout=120)
    next(call)
    assert stub.Abort(generate_pb2.AbortRequest(request_id="to-abort"), timeout=30).aborted
    assert list(call)[-1].finish_reason == generate_pb2.FINISH_REASON_ABORTED
    return "aborted"


def timed_out(stub: generate_pb2_grpc.GenerationServiceStub) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(make_request(PROMPTS[1], max_new_tokens=LONG, ignore_eos=True), timeout=2.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
    return "deadline"


def run_load(router: str) -> dict[str, int]:
    """A bounded mix of requests, at most six at once; returns how many ended which way."""
    jobs: list[Callable[[generate_pb2_grpc.GenerationServiceStub], str]] = []
    for i, prompt in enumerate(PROMPTS):
        greedy = make_request(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        sampled = make_request(prompt, max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.95, seed=i)
        jobs += [lambda stub, r=greedy: generate(stub, r), lambda stub, r=sampled: generate_stream(stub, r)]
    jobs += [lambda stub: generate_stream(stub, make_request(REPETITIVE, max_new_tokens=NEW_TOKENS)),
             lambda stub: rejected(stub, make_request("")),
             lambda stub: rejected(stub, make_request(REPETITIVE, max_new_tokens=0)),
             lambda stub: rejected(stub, make_request(chat=[{"role": "wizard", "content": "hi"}])),
             cancelled, aborted, timed_out]
    with grpc.insecure_channel(router) as channel, ThreadPoolExecutor(6) as pool:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        outcomes = list(pool.map(lambda job: job(stub), jobs))
    return {outcome: outcomes.count(outcome) for outcome in sorted(set(outcomes))}


# ---------------------------------------------------------------------------------------------------------------------
# the deployment, Prometheus and the load, once for the module


@dataclass(frozen=True)
class LoadedFleet:
    prometheus: Prometheus
    started_at: float  # unix time Prometheus began scraping
    evaluated_at: float  # unix time the dashboard queries are evaluated at: just after the load
    outcomes: dict[str, int]


@pytest.fixture(scope="module")
def loaded_fleet(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedFleet]:
    binary = prometheus_binary()
    folder = tmp_path_factory.mktemp("dashboards-e2e")
    ports = {role: free_port() for role in ROLES}
    metrics_ports = {role: free_port() for role in ROLES}
    addresses = {role: f"127.0.0.1:{port}" for role, port in ports.items()}
    env = {"OMP_NUM_THREADS": "1"}  # two cores, three services: keep torch from oversubscribing them

    def service(role: str, args: list[str]) -> Process:
        argv = [sys.executable, "-m", "specfleet.cli", role, "--port", str(ports[role]), "--metrics-port",
                str(metrics_ports[role]), "--redis-url", redis_url, *args]
        return deployment.start(role, argv, env)

    with Deployment(folder / "logs") as deployment:  # stops every process, Prometheus included, on the way out
        redis_port = free_port()
        wait_redis(deployment.start_redis(redis_port), redis_port)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        engine = ["--device", "cpu", "--num-slots", "8", "--max-seq-len", "1024"]
        target = service("target", ["--model", str(smollm2_dir), *engine])
        draft = service("draft", ["--drafter", "ngram"])
        wait_serving(target, addresses["target"], timeout_s=600)
        wait_serving(draft, addresses["draft"], timeout_s=120)
        router = service("router", ["--targets", addresses["target"], "--drafts", addresses["draft"],
                                    "--depth", "auto"])
        wait_serving(router, addresses["router"], timeout_s=120)

        config = folder / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(metrics_ports)))
        prometheus_port = free_port()
        server = deployment.start("prometheus", [
            binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}", "--storage.tsdb.retention.time=1h",
            "--log.level=warn"])
        prometheus = Prometheus(prometheus_port)
        wait_for(prometheus.ready, "Prometheus ready", 60, server)
        started_at = time.time()
        # every service is scraped before the first request, so Prometheus sees the load from its start
        wait_for(lambda: len(prometheus.query("up == 1", time.time())) == len(ROLES), "all three targets up", 30,
                 server)

        outcomes = run_load(addresses["router"])
        # a few more scrapes, so each series has samples after the last request and the gauges have settled
        evaluated_at = time.time() + 3 * SCRAPE_INTERVAL_S
        time.sleep(evaluated_at - time.time() + 2 * SCRAPE_INTERVAL_S)
        yield LoadedFleet(prometheus, started_at, evaluated_at, outcomes)


def test_the_load_ended_every_way(loaded_fleet: LoadedFleet) -> None:
    assert loaded_fleet.outcomes == {"aborted": 1, "cancelled": 1, "deadline": 1, "ok": 9, "rejected": 3}


def test_every_service_is_scraped_with_the_cluster_labels(loaded_fleet: LoadedFleet) -> None:
    up = loaded_fleet.prometheus.query("up", loaded_fleet.evaluated_at)
    by_component = {sample["metric"]["component"]: sample for sample in up}
    assert set(by_component) == set(ROLES)
    for role, sample in by_component.items():
        labels = sample["metric"]
        assert sample["value"][1] == "1", labels
        assert labels["namespace"] == NAMESPACE and labels["job"] == labels["service"] == f"{RELEASE}-specfleet-{role}"
        assert labels["pod"].startswith(labels["service"]) and labels["endpoint"] == "metrics"


def variable_values(fleet: LoadedFleet, dashboard: str) -> dict[str, str]:
    """The dashboard's variables as Grafana fills them in: a query variable gets every value its query finds (as when
    they are all selected), formatted as Grafana formats a multi-value selection for a regex matcher."""
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard_variables(dashboard):
        name, kind = variable["name"], variable["type"]
        if kind == "query":
            definition = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            parsed = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", definition.strip())
            assert parsed, f"{dashboard}: variable ${name}: only label_values(metric, label) is understood here"
            found = fleet.prometheus.label_values(parsed.group(2), parsed.group(1), fleet.started_at,
                                                  fleet.evaluated_at)
            assert found, f"{dashboard}: variable ${name} ({definition}) finds no values"
            escaped = [re.escape(value) for value in found]
            values[name] = escaped[0] if len(escaped) == 1 else f"({'|'.join(escaped)})"
        elif kind in ("custom", "interval"):
            values[name] = variable["query"].split(",")[0].strip()
        elif kind == "constant":
            values[name] = variable["query"]
        else:
            raise AssertionError(f"{dashboard}: variable ${name} of type {kind} is not understood here")
    return values


@pytest.mark.parametrize("dashboard", list(DASHBOARD_FILES))
def test_dashboard_variables_find_the_namespace(loaded_fleet: LoadedFleet, dashboard: str) -> None:
    values = variable_values(loaded_fleet, dashboard)
    assert values["namespace"] == NAMESPACE


QUERIES = dashboard_queries()


@pytest.mark.parametrize("query", QUERIES, ids=[f"{q.dashboard.removesuffix('.json')}:{q.panel_id}:{q.panel}:{q.ref_id}"
                                                for q in QUERIES])
def test_dashboard_query_returns_data(loaded_fleet: LoadedFleet, query: PanelQuery) -> None:
    promql = fill_in(query.expr, variable_values(loaded_fleet, query.dashboard))

    def finite_values() -> list[float]:
        result = loaded_fleet.prometheus.query(promql, loaded_fleet.evaluated_at)
        return [float(sample["value"][1]) for sample in result if math.isfinite(float(sample["value"][1]))]

    deadline = time.monotonic() + 5 * SCRAPE_INTERVAL_S  # a straggling scrape of the last seconds
    while not (values := finite_values()) and time.monotonic() < deadline:
        time.sleep(SCRAPE_INTERVAL_S)
    assert values, f"no data (no series, or only NaN) for {query.describe()}\nas sent to Prometheus: {promql}"


def test_every_panel_query_is_checked() -> None:
    assert len(QUERIES) >= 30
    assert {q.dashboard for q in QUERIES} == {path.name for path in DASHBOARDS}


# ---------------------------------------------------------------------------------------------------------------------
# what is built on vLLM's names, and the autoscalers' metrics

# Queries as vLLM's community dashboards, KEDA recipes and the inference gateway's endpoint picker write them.
VLLM_QUERIES = {
    "requests running": 'sum by (model_name) (vllm:num_requests_running{namespace="$namespace"})',
    "requests waiting": 'sum by (model_name) (vllm:num_requests_waiting{namespace="$namespace"})',
    "KV cache usage": 'max by (model_name) (vllm:kv_cache_usage_perc{namespace="$namespace"})',
    "TTFT p99": "histogram_quantile(0.99, sum by (le, model_name) "
                "(rate(vllm:time_to_first_token_seconds_bucket[$__rate_interval])))",
    "ITL p50": "histogram_quantile(0.5, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket[$__rate_interval])))",
    "TPOT mean": "rate(vllm:request_time_per_output_token_seconds_sum[$__rate_interval]) / "
                 "rate(vllm:request_time_per_output_token_seconds_count[$__rate_interval])",
    "E2E p90": "histogram_quantile(0.9, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket[$__rate_interval])))",
    "queue time mean": "rate(vllm:request_queue_time_seconds_sum[$__rate_interval]) / "
                       "rate(vllm:request_queue_time_seconds_count[$__rate_interval])",
    "prompt tokens/s": "sum(rate(vllm:prompt_tokens_total[$__rate_interval]))",
    "generation tokens/s": "sum(rate(vllm:generation_tokens_total[$__rate_interval]))",
    "finished by reason": "sum by (finished_reason) (increase(vllm:request_success_total[$__rate_interval]))",
    "draft acceptance rate": "sum(rate(vllm:spec_decode_num_accepted_tokens_total[$__rate_interval])) / "
                             "sum(rate(vllm:spec_decode_num_draft_tokens_total[$__rate_interval]))",
    "mean acceptance length": "1 + sum(rate(vllm:spec_decode_num_accepted_tokens_total[$__rate_interval])) / "
                              "sum(rate(vllm:spec_decode_num_drafts_total[$__rate_interval]))",
    "acceptance by position": "sum by (position) (rate(vllm:spec_decode_num_accepted_tokens_per_pos_total"
                              "[$__rate_interval])) / ignoring(position) group_left "
                              "sum(rate(vllm:spec_decode_num_drafts_total[$__rate_interval]))",
}


def finite_results(fleet: LoadedFleet, promql: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5 * SCRAPE_INTERVAL_S  # a straggling scrape of the last seconds
    while True:
        result = [sample for sample in fleet.prometheus.query(promql, fleet.evaluated_at)
                  if math.isfinite(float(sample["value"][1]))]
        if result or time.monotonic() > deadline:
            return result
        time.sleep(SCRAPE_INTERVAL_S)


@pytest.mark.parametrize("name", list(VLLM_QUERIES))
def test_queries_written_for_vllm_return_data(loaded_fleet: LoadedFleet, name: str) -> None:
    promql = fill_in(VLLM_QUERIES[name], {**GRAFANA_BUILTINS, "namespace": NAMESPACE})
    assert finite_results(loaded_fleet, promql), f"no data for {name}: {promql}"


def test_the_adapter_rules_give_every_pod_its_metric(loaded_fleet: LoadedFleet) -> None:
    """Each rule of prometheus-adapter-values.yaml, with its placeholders filled in as the adapter fills them for
    an HPA's request about the pods of our namespace, returns one value per pod that serves the series."""
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    pods_by_series = {"specfleet_service_live_sequences": {f"{RELEASE}-specfleet-{r}-0" for r in ("draft", "target")},
                      "vllm:num_requests_waiting": {f"{RELEASE}-specfleet-router-0"}}
    assert {rule["seriesQuery"].split("{")[0] for rule in rules} == set(pods_by_series)
    for rule in rules:
        series = rule["seriesQuery"].split("{")[0]
        promql = (rule["metricsQuery"].replace("<<.Series>>", series)
                  .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~".+"').replace("<<.GroupBy>>", "pod"))
        result = finite_results(loaded_fleet, promql)
        assert {sample["metric"]["pod"] for sample in result} == pods_by_series[series], promql
