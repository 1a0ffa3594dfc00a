"""What becomes of each step's `StepStats` outside the router: Redis telemetry for the fleet's depth policy, and
OpenTelemetry metrics and the step's span. (The prediction audit and its calibration observe steps too, in
`router.prediction_audit`.)"""

from __future__ import annotations

import asyncio

from opentelemetry import trace

from specfleet.otel import RouterMetrics
from specfleet.stats import StepStats
from specfleet.telemetry import TelemetryWriter


class TelemetryExporter:
    """Sends each step's acceptance counts and the router's own share of its time to Redis."""

    def __init__(self, writer: TelemetryWriter) -> None:
        self.writer = writer

    def observe(self, stats: StepStats) -> None:
        # What the services do not see: gRPC, (de)serialisation and the loop's own bookkeeping. A step that calls
        # the drafters pays one more round trip, so it goes under its depth (1 + depth, as Verify's).
        overhead_ms = stats.duration_s * 1000 - stats.draft_ms - stats.verify_ms
        # It reads no KV cache: context 0, whatever the sequences' lengths.
        self.writer.record_latency(stats.batch_size, 1.0 + stats.deepest, max(0.0, overhead_ms), role="overhead",
                                   context=0.0)
        for drafter, counts in stats.acceptance_by_drafter.items():
            self.writer.record_acceptance(counts, drafter)


class MetricsExporter:
    """Annotates the step's span and feeds the router's OpenTelemetry instruments."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics

    def observe(self, stats: StepStats) -> None:
        self.metrics.annotate_step(trace.get_current_span(), stats)
        # The instruments cost microseconds per sequence: on the event loop's next turn they run while the next step
        # waits for its Propose/Verify calls, not inside this step.
        asyncio.get_running_loop().call_soon(self.metrics.record_step, stats)
