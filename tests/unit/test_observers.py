"""What the router tells the fleet of each step: its own share of the step's time, and the acceptance of each
drafter kind apart (the prior of sequences that draft with that kind)."""

from __future__ import annotations

import pytest

from router.observers import TelemetryExporter
from specfleet.stats import AcceptanceCounts, SequenceStep, StepStats


class Written:
    """A `TelemetryWriter` that keeps what it is given."""

    def __init__(self) -> None:
        self.latency: list[tuple] = []
        self.acceptance: list[tuple[str | None, AcceptanceCounts]] = []

    def record_latency(self, *args, **kwargs) -> None:
        self.latency.append((args, kwargs))

    def record_acceptance(self, counts: AcceptanceCounts, drafter: str | None = None) -> None:
        self.acceptance.append((drafter, counts))


def test_each_drafter_kinds_acceptance_goes_to_the_fleet_apart() -> None:
    stats = StepStats("target:1", batch_size=4, planned=[3, 3, 3, 0], deepest=3, draft_ms=1.0, verify_ms=20.0,
                      duration_s=0.025)
    stats.observe(SequenceStep(3, drafted=3, accepted=3), "model")
    stats.observe(SequenceStep(3, drafted=3, accepted=0, first_rejected=1), "ngram")
    stats.observe(SequenceStep(3, drafted=3, accepted=1, first_rejected=1))  # a kind not known (yet)
    stats.observe(SequenceStep(0), "ngram")  # plain decoding: no drafts asked, nothing to count
    written = Written()
    TelemetryExporter(written).observe(stats)  # type: ignore[arg-type]
    assert {k: (c.sequence_steps, c.accepted, c.rejections) for k, c in written.acceptance} == {
        "model": (1, 3, 0), "ngram": (1, 0, 1), None: (1, 1, 1)}
    assert (stats.acceptance.sequence_steps, stats.acceptance.accepted) == (3, 4)  # the step's total, as before
    (args, kwargs), = written.latency
    assert args[:2] == (4, 4.0) and args[2] == pytest.approx(4.0) and kwargs["role"] == "overhead"  # 25 - 1 - 20 ms
