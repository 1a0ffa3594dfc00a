"""Telemetry against a real redis-server: samples round-trip, dead replicas expire, streams stay capped,
and a writer survives Redis going away and coming back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from specfleet.launcher import Deployment, free_port, wait_redis
from specfleet.policy import CostSample
from specfleet.stats import AcceptanceCounts, SequenceStep
from specfleet.telemetry import TelemetryReader, TelemetryWriter


class RedisServer:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.deployment = Deployment(log_dir)

    def start(self) -> None:
        wait_redis(self.deployment.start_redis(self.port), self.port)

    def stop(self) -> None:
        self.deployment.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path)
    s.start()
    yield s
    s.stop()


def _wait(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_samples_and_acceptance_round_trip(server: RedisServer) -> None:
    target = TelemetryWriter(server.url, role="target", replica="t0", prefix="t1", flush_interval_s=0.05)
    router = TelemetryWriter(server.url, role="router", replica="r0", prefix="t1", flush_interval_s=0.05)
    reader = TelemetryReader(server.url, prefix="t1")
    try:
        target.record_latency(4, 3.0, 41.5)
        target.record_latency(8, 5.0, 77.0)
        router.record_latency(4, 1.0, 2.5, role="overhead")
        step = AcceptanceCounts()
        step.observe(SequenceStep(4, drafted=4, accepted=2, first_rejected=1))
        step.observe(SequenceStep(4, drafted=4, accepted=4))
        step.observe(SequenceStep(4))  # asked, nothing offered
        step.observe(SequenceStep(5, drafted=5, accepted=2, first_rejected=1, later_siblings_accepted=1,
                                  later_siblings_tried=3))
        router.record_acceptance(step)
        assert _wait(lambda: len(reader.read().samples) == 3)
        view = reader.read()
        assert sorted(view.samples, key=lambda s: s.ms) == [
            CostSample("overhead", 4, 1.0, 2.5), CostSample("target", 4, 3.0, 41.5), CostSample("target", 8, 5.0, 77.0)]
        assert view.live_replicas == {"target": ["t0"], "router": ["r0"]}
        a = view.acceptance
        assert (a.sequence_steps, a.accepted, a.rejections, a.misses, a.offers) == (4, 8, 2, 1, 3)
        assert (a.later_siblings_accepted, a.later_siblings_tried, a.first_accepted, a.later_siblings_rejected) == (
            1, 3, 7, 2)
        assert a.proposed_by_position == [3, 3, 3, 3, 1] and a.accepted_by_position == [3, 3, 1, 1]
        # Another prefix is another fleet.
        assert TelemetryReader(server.url, prefix="other").read().samples == []
    finally:
        target.close()
        router.close()


def test_latency_context_round_trips_and_entries_without_it_still_read(server: RedisServer) -> None:
    target = TelemetryWriter(server.url, role="target", replica="t0", prefix="t6", flush_interval_s=0.05)
    reader = TelemetryReader(server.url, prefix="t6")
    client = redis.Redis.from_url(server.url)
    try:
        target.record_latency(4, 3.0, 41.5, context=2048.5)
        target.record_latency(4, 3.0, 20.0)  # unknown context: written without the field
        target.record_latency(2, 1.0, 3.0, role="overhead", context=0.0)
        target.record_latency(4, 2.5, 50.0, context=100.0, widest=4.0)  # a ragged verify
        # An entry as a writer from before contexts were recorded wrote it.
        client.xadd("t6:latency", {"role": "target", "replica": "t0", "batch": 8, "tokens": 5.0, "ms": 77.0})
        assert _wait(lambda: len(reader.read().samples) == 5)
        assert sorted(reader.read().samples, key=lambda s: s.ms) == [
            CostSample("overhead", 2, 1.0, 3.0, 0.0), CostSample("target", 4, 3.0, 20.0),
            CostSample("target", 4, 3.0, 41.5, 2048.5), CostSample("target", 4, 2.5, 50.0, 100.0, widest=4.0),
            CostSample("target", 8, 5.0, 77.0)]
        fields = [f for _, f in client.xrange("t6:latency")]
        assert {f[b"ms"]: f.get(b"context") for f in fields} == {b"41.5": b"2048.5", b"20.0": None, b"3.0": b"0.0",
                                                                 b"50.0": b"100.0", b"77.0": None}
        assert {f[b"ms"]: f.get(b"widest") for f in fields if b"widest" in f} == {b"50.0": b"4.0"}
        # What an older reader reads (the fields it knows) is there in every entry.
        assert all({b"role", b"replica", b"batch", b"tokens", b"ms"} <= f.keys() for f in fields)
    finally:
        target.close()
        client.close()


def test_acceptance_round_trips_per_drafter_kind(server: RedisServer) -> None:
    router = TelemetryWriter(server.url, role="router", replica="r0", prefix="t7", flush_interval_s=0.05)
    reader = TelemetryReader(server.url, prefix="t7")
    client = redis.Redis.from_url(server.url)
    try:
        by_kind = {"ngram": SequenceStep(4, drafted=4, accepted=1, first_rejected=1),
                   "model": SequenceStep(4, drafted=4, accepted=4), None: SequenceStep(2, drafted=2, accepted=2)}
        for kind, step in by_kind.items():
            counts = AcceptanceCounts()
            counts.observe(step)
            router.record_acceptance(counts, kind)
        # An entry as a writer from before kinds were recorded wrote it: the fleet's total only.
        client.xadd("t7:acceptance", {"replica": "r1", "steps": 1, "accepted": 0, "rejections": 1,
                                      "proposed_by_position": "1", "accepted_by_position": ""})
        assert _wait(lambda: reader.read().acceptance.sequence_steps == 4)
        view = reader.read()
        assert (view.acceptance.accepted, view.acceptance.rejections) == (7, 2)
        assert {k: (c.accepted, c.rejections) for k, c in view.acceptance_by_drafter.items()} == {
            "ngram": (1, 1), "model": (4, 0)}
    finally:
        router.close()
        client.close()


def test_dead_replica_expires_and_its_samples_are_ignored(server: RedisServer) -> None:
    live = TelemetryWriter(server.url, role="target", replica="alive", prefix="t2", flush_interval_s=0.05,
                           heartbeat_ttl_s=0.6)
    dead = TelemetryWriter(server.url, role="target", replica="dead", prefix="t2", flush_interval_s=0.05,
                           heartbeat_ttl_s=0.6)
    reader = TelemetryReader(server.url, prefix="t2")
    try:
        live.record_latency(1, 1.0, 10.0)
        dead.record_latency(1, 1.0, 99.0)
        assert _wait(lambda: len(reader.read().samples) == 2)
        dead._stop.set()  # the process dies without a goodbye: no more heartbeats, no delete
        dead._thread.join()
        assert _wait(lambda: reader.read().live_replicas == {"target": ["alive"]}, timeout_s=3.0)
        assert [s.ms for s in reader.read().samples] == [10.0]
        # A report on one replica's calls still finds the gone one's, each under its writer.
        by_writer = sorted((replica, s.ms) for replica, s in reader.samples_by_replica())
        assert by_writer == [("alive", 10.0), ("dead", 99.0)]
    finally:
        live.close()


def test_streams_stay_capped(server: RedisServer) -> None:
    writer = TelemetryWriter(server.url, role="draft", replica="d0", prefix="t3", flush_interval_s=0.05,
                             latency_cap=50)
    try:
        for i in range(400):
            writer.record_latency(1, 2.0, float(i))
        client = redis.Redis.from_url(server.url)
        assert _wait(lambda: client.xlen("t3:latency") == 50 and writer._samples.empty())
        writer.flush()
        assert client.xlen("t3:latency") == 50
        newest = TelemetryReader(server.url, prefix="t3").read().samples
        assert max(s.ms for s in newest) == 399.0 and min(s.ms for s in newest) == 350.0
    finally:
        writer.close()


def test_writer_and_reader_survive_redis_restart(server: RedisServer) -> None:
    writer = TelemetryWriter(server.url, role="target", replica="t0", prefix="t4", flush_interval_s=0.05)
    reader = TelemetryReader(server.url, prefix="t4")
    try:
        writer.record_latency(1, 1.0, 5.0)
        assert _wait(lambda: len(reader.read().samples) == 1)
        server.stop()
        writer.record_latency(1, 1.0, 6.0)  # dropped or queued, never raised
        assert _wait(lambda: not writer.redis_up)
        assert reader.read() is None
        server.start()  # a fresh, empty Redis on the same port
        writer.record_latency(1, 1.0, 7.0)
        assert _wait(lambda: writer.redis_up and reader.read() is not None
                     and 7.0 in [s.ms for s in reader.read().samples])
    finally:
        writer.close()


def test_reader_keeps_its_window_and_fetches_only_new_entries(server: RedisServer) -> None:
    writer = TelemetryWriter(server.url, role="target", replica="t0", prefix="t5", flush_interval_s=0.05)
    reader = TelemetryReader(server.url, prefix="t5", latency_window=3)
    try:
        for ms in (1.0, 2.0):
            writer.record_latency(1, 1.0, ms)
        assert _wait(lambda: [s.ms for s in reader.read().samples] == [1.0, 2.0])
        assert [s.ms for s in reader.read().samples] == [1.0, 2.0]  # nothing new: the same window, not doubled
        for ms in (3.0, 4.0):
            writer.record_latency(1, 1.0, ms)
        assert _wait(lambda: [s.ms for s in reader.read().samples] == [2.0, 3.0, 4.0])  # the newest 3
    finally:
        writer.close()
