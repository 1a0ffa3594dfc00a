"""Fleet telemetry in Redis: latency samples, acceptance counts and heartbeats.

Services write through a `TelemetryWriter`, which queues records and flushes them from a background
thread, so a slow or absent Redis never stalls a step. The router's policy reads a `FleetView`
through `TelemetryReader` about once a second. Everything lives under one key prefix:

    {prefix}:latency              capped stream of latency samples (role, replica, batch, tokens, ms, context,
                                  drafter, widest)
    {prefix}:acceptance           capped stream of acceptance counts per flush of each router
    {prefix}:heartbeat:{role}:{replica}   a key with a TTL, refreshed while the replica lives

Samples of a replica whose heartbeat expired are ignored: a dead replica's old numbers should not
steer the fleet. A latency sample's ``context`` (the call's mean KV length per sequence, `CostSample.context`) is
written only when known; an entry without it (an older writer) reads as unknown, and readers that predate it ignore
it, so old and new replicas share one stream. ``drafter`` (a draft sample's drafter kind) and ``widest`` (a ragged
verify's widest row, `CostSample.widest`) are optional the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import redis

from specfleet.policy import CostSample
from specfleet.stats import AcceptanceCounts

log = logging.getLogger("specfleet.telemetry")

DEFAULT_PREFIX = "specfleet"
LATENCY_STREAM_CAP = 20_000
ACCEPTANCE_STREAM_CAP = 5_000
HEARTBEAT_TTL_S = 10.0


@dataclass(frozen=True)
class LatencySample:
    role: str  # "draft", "target", "overhead" (the rest of a router step) or "draft_prefill", see CostSample.role
    replica: str
    batch_size: int
    tokens_per_seq: float
    ms: float
    context: float | None = None  # mean KV length per sequence of the call (None: unknown), see CostSample.context
    drafter: str | None = None  # a draft service's drafter kind, see CostSample.drafter
    widest: float | None = None  # a ragged verify's widest sequence's tokens, see CostSample.widest


@dataclass(frozen=True)
class FleetView:
    """What the policy needs from the fleet: recent costs of live replicas and acceptance."""

    samples: list[CostSample]
    acceptance: AcceptanceCounts
    live_replicas: dict[str, list[str]]  # role -> replica names with a fresh heartbeat
    # The acceptance counts of each drafter kind that said its kind (part of ``acceptance``).
    acceptance_by_drafter: dict[str, AcceptanceCounts] = field(default_factory=dict)


class TelemetrySource(Protocol):
    """Where the policy gets its numbers; Redis in production, anything in tests."""

    def read(self) -> FleetView | None:
        """The current view, or None when the source is unreachable."""
        ...


def _keys(prefix: str) -> tuple[str, str, str]:
    return f"{prefix}:latency", f"{prefix}:acceptance", f"{prefix}:heartbeat"


class TelemetryWriter:
    """Queues latency samples and acceptance counts and writes them to Redis from a daemon thread,
    with a heartbeat for this replica. Never blocks the caller; drops records while Redis is down."""

    def __init__(self, url: str, *, role: str, replica: str, prefix: str = DEFAULT_PREFIX,
                 flush_interval_s: float = 0.2, heartbeat_ttl_s: float = HEARTBEAT_TTL_S,
                 latency_cap: int = LATENCY_STREAM_CAP, acceptance_cap: int = ACCEPTANCE_STREAM_CAP) -> None:
        self.url, self.role, self.replica = url, role, replica
        self.latency_key, self.acceptance_key, heartbeat = _keys(prefix)
        self.heartbeat_key = f"{heartbeat}:{role}:{replica}"
        self.flush_interval_s, self.heartbeat_ttl_s = flush_interval_s, heartbeat_ttl_s
        self.latency_cap, self.acceptance_cap = latency_cap, acceptance_cap
        self._client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._samples: queue.Queue[LatencySample] = queue.Queue(maxsize=10_000)
        self._acceptance: dict[str | None, AcceptanceCounts] = {}  # by drafter kind
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_heartbeat = 0.0
        self.redis_up = True
        self._thread = threading.Thread(target=self._run, name=f"telemetry-{role}", daemon=True)
        self._thread.start()

    def record_latency(self, batch_size: int, tokens_per_seq: float, ms: float, role: str | None = None,
                       context: float | None = None, drafter: str | None = None, widest: float | None = None
                       ) -> None:
        """One call's latency; ``context``: its mean KV length per sequence (`CostSample.context`; None: unknown);
        ``drafter``: a draft service's drafter kind (`CostSample.drafter`); ``widest``: a ragged verify's widest
        sequence's tokens (`CostSample.widest`; None: as the mean)."""
        # A full queue means Redis has been down for a while: old news is worth little anyway.
        with contextlib.suppress(queue.Full):
            self._samples.put_nowait(LatencySample(role or self.role, self.replica, batch_size, tokens_per_seq, ms,
                                                   context, drafter, widest))

    def record_acceptance(self, counts: AcceptanceCounts, drafter: str | None = None) -> None:
        """Acceptance counts of drafts from ``drafter`` (a drafter kind; None: not known)."""
        with self._lock:
            self._acceptance.setdefault(drafter, AcceptanceCounts()).merge(counts)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        with contextlib.suppress(redis.RedisError):
            self._client.delete(self.heartbeat_key)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()

    def flush(self) -> None:
        samples = []
        while not self._samples.empty():
            samples.append(self._samples.get_nowait())
        with self._lock:
            acceptance, self._acceptance = self._acceptance, {}
        try:
            pipe = self._client.pipeline(transaction=False)
            for s in samples:
                pipe.xadd(self.latency_key, _latency_fields(s), maxlen=self.latency_cap, approximate=False)
            for drafter, counts in acceptance.items():
                if not counts.empty():
                    pipe.xadd(self.acceptance_key, _acceptance_fields(counts, self.replica, drafter),
                              maxlen=self.acceptance_cap, approximate=False)
            now = time.monotonic()
            if now - self._last_heartbeat > self.heartbeat_ttl_s / 3:
                pipe.set(self.heartbeat_key, self.replica, px=int(self.heartbeat_ttl_s * 1000))
                self._last_heartbeat = now
            pipe.execute()
        except redis.RedisError as err:
            self._last_heartbeat = 0.0
            if self.redis_up:
                log.warning("Redis at %s unreachable (%s): telemetry is dropped until it returns", self.url, err)
            self.redis_up = False
            return
        if not self.redis_up:
            log.info("Redis at %s is back: telemetry resumes", self.url)
        self.redis_up = True


def _latency_fields(sample: LatencySample) -> dict[str, str | int | float]:
    fields: dict[str, str | int | float] = {"role": sample.role, "replica": sample.replica,
                                            "batch": sample.batch_size, "tokens": sample.tokens_per_seq,
                                            "ms": round(sample.ms, 3)}
    if sample.context is not None:  # absent, not empty, when unknown: the format older writers wrote
        fields["context"] = round(sample.context, 3)
    if sample.drafter is not None:
        fields["drafter"] = sample.drafter
    if sample.widest is not None:
        fields["widest"] = round(sample.widest, 3)
    return fields


def _cost_sample_from_fields(f: dict[bytes, bytes]) -> CostSample:
    """A latency entry as `_latency_fields` writes it; one without a context (an older writer's) has context None,
    one without a widest row (a uniform call's, or an older writer's) has widest None."""
    context, drafter, widest = f.get(b"context"), f.get(b"drafter"), f.get(b"widest")
    return CostSample(f[b"role"].decode(), int(f[b"batch"]), float(f[b"tokens"]), float(f[b"ms"]),
                      None if context is None else float(context), None if drafter is None else drafter.decode(),
                      None if widest is None else float(widest))


def _acceptance_fields(counts: AcceptanceCounts, replica: str, drafter: str | None = None) -> dict[str, str | int]:
    fields: dict[str, str | int] = {
        "replica": replica, "steps": counts.sequence_steps, "accepted": counts.accepted,
        "rejections": counts.rejections, "misses": counts.misses,
        "later_siblings_accepted": counts.later_siblings_accepted,
        "later_siblings_tried": counts.later_siblings_tried,
        "proposed_by_position": ",".join(map(str, counts.proposed_by_position)),
        "accepted_by_position": ",".join(map(str, counts.accepted_by_position))}
    if drafter is not None:  # absent when unknown, as older writers wrote every entry
        fields["drafter"] = drafter
    return fields


def _acceptance_from_fields(f: dict[bytes, bytes]) -> AcceptanceCounts:
    """An acceptance entry as `_acceptance_fields` writes it. Fields newer writers add default to 0, and the later
    sibling counts are read under the names older writers gave them too (sibling_accepted, sibling_tried)."""
    return AcceptanceCounts(
        sequence_steps=int(f[b"steps"]), accepted=int(f[b"accepted"]), rejections=int(f[b"rejections"]),
        misses=int(f.get(b"misses", 0)),
        later_siblings_accepted=int(f.get(b"later_siblings_accepted", f.get(b"sibling_accepted", 0))),
        later_siblings_tried=int(f.get(b"later_siblings_tried", f.get(b"sibling_tried", 0))),
        proposed_by_position=_ints(f[b"proposed_by_position"]), accepted_by_position=_ints(f[b"accepted_by_position"]))


def _ints(text: bytes) -> list[int]:
    return [int(x) for x in text.decode().split(",") if x]


class TelemetryReader:
    """Reads the recent window of fleet telemetry from Redis (a `TelemetrySource`).

    Each read fetches only the entries added since the previous one and keeps the window in memory, so a
    refresh every second costs what the fleet wrote in that second, not the whole window again.
    """

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, latency_window: int = 4_000,
                 acceptance_window: int = 500) -> None:
        self.url = url
        self.latency_key, self.acceptance_key, self.heartbeat_prefix = _keys(prefix)
        self._client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._latency: deque[tuple[str, CostSample]] = deque(maxlen=latency_window)  # (replica, sample), oldest first
        # (drafter kind or None, counts), oldest first
        self._acceptance: deque[tuple[str | None, AcceptanceCounts]] = deque(maxlen=acceptance_window)
        self._last_ids: dict[str, bytes] = {}  # stream key -> id of the newest entry read

    def live_replicas(self) -> dict[str, list[str]]:
        live: dict[str, list[str]] = {}
        for key in self._client.scan_iter(match=f"{self.heartbeat_prefix}:*", count=500):
            role, replica = key.decode().removeprefix(f"{self.heartbeat_prefix}:").split(":", 1)
            live.setdefault(role, []).append(replica)
        return live

    def read(self) -> FleetView | None:
        try:
            live = self.live_replicas()
            latency = self._new_entries(self.latency_key, self._latency.maxlen)
            acceptance_entries = self._new_entries(self.acceptance_key, self._acceptance.maxlen)
        except redis.RedisError:
            return None
        for _, f in latency:
            try:
                self._latency.append((f[b"replica"].decode(), _cost_sample_from_fields(f)))
            except (KeyError, ValueError):  # another version's or a hand-written entry: skip it
                continue
        for _, f in acceptance_entries:
            try:
                drafter = f.get(b"drafter")
                self._acceptance.append((None if drafter is None else drafter.decode(), _acceptance_from_fields(f)))
            except (KeyError, ValueError):
                continue
        alive = {replica for replicas in live.values() for replica in replicas}
        acceptance, by_drafter = AcceptanceCounts(), dict[str, AcceptanceCounts]()
        for drafter, counts in self._acceptance:
            acceptance.merge(counts)
            if drafter is not None:
                by_drafter.setdefault(drafter, AcceptanceCounts()).merge(counts)
        return FleetView([sample for replica, sample in self._latency if replica in alive], acceptance, live,
                         by_drafter)

    def samples_by_replica(self) -> list[tuple[str, CostSample]]:
        """The latency samples read so far (the newest ``latency_window``), oldest first, each with the replica that
        wrote it, live or gone: for a report on one replica's calls."""
        return list(self._latency)

    def _new_entries(self, key: str, window: int | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The entries of stream ``key`` added since the last read (the newest ``window`` of them), oldest first.
        Stream ids grow with the server's clock, so this holds across a Redis restart too."""
        last = self._last_ids.get(key)
        entries = self._client.xrevrange(key, min=b"(" + last if last else "-", count=window)
        if entries:
            self._last_ids[key] = entries[0][0]
        return entries[::-1]

    def close(self) -> None:
        self._client.close()


def replica_name(role: str, port: int) -> str:
    """How this process names itself in telemetry: the pod name in Kubernetes, else host:port."""
    return os.environ.get("SPECFLEET_REPLICA") or os.environ.get("POD_NAME") or f"{role}@{socket.gethostname()}:{port}"


def writer_for(url: str, role: str, port: int, prefix: str) -> TelemetryWriter | None:
    return TelemetryWriter(url, role=role, replica=replica_name(role, port), prefix=prefix) if url else None
