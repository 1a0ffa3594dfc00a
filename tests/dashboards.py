"""The chart's Grafana dashboards as the tests read them, and the metric names the services export, which the
dashboards are checked against (tests/deploy/test_helm.py, tests/deploy/test_dashboards.py) and the services'
exporters too (tests/e2e/test_otel.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from helm_tools import CHART

DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
# The metric families the services export (histograms with _bucket/_sum/_count, as Prometheus shows them).
COUNTERS_AND_GAUGES = {
    "specfleet_requests_total", "specfleet_prompt_tokens_total", "specfleet_generated_tokens_total",
    "specfleet_draft_tokens_total",
    "specfleet_accepted_tokens_total", "specfleet_draft_position_proposed_total",
    "specfleet_draft_position_accepted_total", "specfleet_step_emitted_tokens_total",
    "specfleet_step_duration_seconds_total", "specfleet_queue_depth", "specfleet_live_requests", "specfleet_slot_usage",
    "specfleet_reprefills_total", "specfleet_redis_up", "specfleet_service_live_sequences",
    "specfleet_canary_replays_total", "specfleet_canary_mismatches_total", "specfleet_drafts_ahead_total",
    "specfleet_service_prompt_tokens_total", "specfleet_service_reused_prompt_tokens_total",
}
HISTOGRAMS = {
    "specfleet_time_to_first_token_seconds", "specfleet_time_per_output_token_seconds",
    "specfleet_e2e_request_latency_seconds", "specfleet_request_queue_time_seconds", "specfleet_step_batch_size",
    "specfleet_speculation_depth", "specfleet_accepted_tokens_per_step", "specfleet_draft_latency_seconds",
    "specfleet_verify_latency_seconds", "specfleet_service_batch_latency_seconds",
}
# The router's families under vLLM's names (specfleet/vllm_metrics.py), by Prometheus type.
VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter", "vllm:request_success": "counter",
    "vllm:request_prompt_tokens": "histogram", "vllm:request_generation_tokens": "histogram",
    "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram", "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram", "vllm:spec_decode_num_drafts": "counter",
    "vllm:spec_decode_num_draft_tokens": "counter", "vllm:spec_decode_num_accepted_tokens": "counter",
    "vllm:spec_decode_num_accepted_tokens_per_pos": "counter",
}
ADAPTER_VALUES = CHART.parent / "prometheus-adapter-values.yaml"
KNOWN_SERIES = COUNTERS_AND_GAUGES | {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")}
# Values for Grafana's variables, so the queries become plain PromQL.
GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "namespace": ".*"}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def expressions(path: Path) -> list[str]:
    return [target["expr"] for panel in panels(json.loads(path.read_text())) for target in panel.get("targets", [])]


def fill_in(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana's ``$name`` / ``${name}`` variables replaced by ``values``."""
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"no value for Grafana variable ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, expr)


def as_promql(expr: str) -> str:
    return fill_in(expr, GRAFANA_VARIABLES)
