"""Fleet telemetry in Redis: latency samples, acceptance counts and heartbeats.

Services write through a `TelemetryWriter`, which queues records and flushes them from a background
thread, so a slow or absent Redis never stalls a step. The router's policy reads a `FleetView`
through `TelemetryReader` about once a second. Everything lives under one key prefix:

    {prefix}:latency              capped stream of latency samples (role, replica, batch, tokens, ms)
    {prefix}:acceptance           capped stream of acceptance counts per flush of each router
    {prefix}:heartbeat:{role}:{replica}   a key with a TTL, refreshed while the replica lives

Samples of a replica whose heartbeat expired are ignored: a dead replica's old numbers should not
steer the fleet.
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
from typing import TYPE_CHECKING, Protocol

import redis

from specfleet.policy import CostSample

if TYPE_CHECKING:  # only annotated here; importing it would load torch
    from specfleet.trees.shapes import TryCounts

log = logging.getLogger("specfleet.telemetry")

DEFAULT_PREFIX = "specfleet"
LATENCY_STREAM_CAP = 20_000
ACCEPTANCE_STREAM_CAP = 5_000
HEARTBEAT_TTL_S = 10.0
# A step sends each sequence the tokens committed since its last call: at most the accepted drafts plus
# one (17 at the deepest). More than that is a (re)prefill of a whole prompt.
PREFILL_TOKENS = 18


@dataclass(frozen=True)
class LatencySample:
    role: str  # "draft", "target" or "overhead" (the rest of a router step; tokens_per_seq 1 + its depth)
    replica: str
    batch_size: int
    tokens_per_seq: float
    ms: float


@dataclass
class AcceptanceCounts:
    """Counts over the sequence-steps that asked for drafts: ``accepted`` counts accepted drafts, ``rejections``
    rejected first tries (for a chain: steps in which a draft was rejected), ``misses`` steps in which the drafter
    offered nothing; ``sibling_accepted``/``sibling_tried`` count a tree's later siblings, tried after an elder's
    rejection (their acceptances are among ``accepted`` too); ``proposed[j]``/``accepted[j]`` count drafts at
    position j (0 = the first draft token)."""

    sequence_steps: int = 0
    accepted: int = 0
    rejections: int = 0
    proposed_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    misses: int = 0
    sibling_accepted: int = 0
    sibling_tried: int = 0

    @property
    def first_accepted(self) -> int:
        """Accepted drafts that were the first child tried at their node (every accepted draft of a chain)."""
        return self.accepted - self.sibling_accepted

    @property
    def sibling_rejected(self) -> int:
        return self.sibling_tried - self.sibling_accepted

    @property
    def offers(self) -> int:
        """Sequence-steps in which the drafter offered at least one token."""
        return self.sequence_steps - self.misses

    def add_step(self, drafted: int, accepted: int, rejections: int | None = None, tries: TryCounts | None = None
                 ) -> None:
        """A chain's ``rejections`` is whether it stopped short of its end (by default, whether it accepted fewer
        than ``drafted``); a tree's come from its ``tries`` (`specfleet.trees.count_tries`). ``drafted`` 0 is a
        miss: asked, the drafter had nothing to offer."""
        if tries is not None:
            rejections = tries.first_rejected
            self.sibling_accepted += tries.later_siblings_accepted
            self.sibling_tried += tries.later_siblings_tried
        self.sequence_steps += 1
        self.misses += int(drafted == 0)
        self.accepted += accepted
        self.rejections += int(accepted < drafted) if rejections is None else rejections
        _grow(self.proposed_by_position, drafted)
        _grow(self.accepted_by_position, accepted)
        for j in range(drafted):
            self.proposed_by_position[j] += 1
        for j in range(accepted):
            self.accepted_by_position[j] += 1

    def merge(self, other: AcceptanceCounts) -> None:
        self.sequence_steps += other.sequence_steps
        self.misses += other.misses
        self.accepted += other.accepted
        self.rejections += other.rejections
        self.sibling_accepted += other.sibling_accepted
        self.sibling_tried += other.sibling_tried
        for mine, theirs in ((self.proposed_by_position, other.proposed_by_position),
                             (self.accepted_by_position, other.accepted_by_position)):
            _grow(mine, len(theirs))
            for j, n in enumerate(theirs):
                mine[j] += n

    def empty(self) -> bool:
        return self.sequence_steps == 0


def _grow(counts: list[int], length: int) -> None:
    counts.extend([0] * (length - len(counts)))


@dataclass
class StepRecord:
    """What one router step did, filled by the step loop and read by the exporters (the acceptance counts go to
    Redis for the depth policy; everything goes to OpenTelemetry, see specfleet/otel.py)."""

    batch_size: int
    depths: list[int]  # the depth chosen for each sequence
    acceptance: AcceptanceCounts = field(default_factory=AcceptanceCounts)
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted, per sequence that got drafts
    emitted: int = 0  # tokens emitted, all sequences
    first_token_s: list[float] = field(default_factory=list)  # time to first token of sequences that got theirs
    duration_s: float = 0.0

    def add_sequence(self, drafted: int, accepted: int, emitted: int, rejections: int | None = None,
                     asked: bool = False, tries: TryCounts | None = None) -> None:
        """``asked``: whether the sequence asked for drafts this step; one that asked and got none is a miss, which
        the policy counts apart from rejections (a sequence that got drafts asked for them). ``rejections`` and
        ``tries`` as in `AcceptanceCounts.add_step`."""
        self.emitted += emitted
        if drafted or asked:
            self.acceptance.add_step(drafted, accepted, rejections, tries)
        if drafted:
            self.accepted.append(accepted)


@dataclass(frozen=True)
class FleetView:
    """What the policy needs from the fleet: recent costs of live replicas and acceptance."""

    samples: list[CostSample]
    acceptance: AcceptanceCounts
    live_replicas: dict[str, list[str]]  # role -> replica names with a fresh heartbeat


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
        self._acceptance = AcceptanceCounts()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_heartbeat = 0.0
        self.redis_up = True
        self._thread = threading.Thread(target=self._run, name=f"telemetry-{role}", daemon=True)
        self._thread.start()

    def record_latency(self, batch_size: int, tokens_per_seq: float, ms: float, role: str | None = None) -> None:
        # A full queue means Redis has been down for a while: old news is worth little anyway.
        with contextlib.suppress(queue.Full):
            self._samples.put_nowait(LatencySample(role or self.role, self.replica, batch_size, tokens_per_seq, ms))

    def record_acceptance(self, counts: AcceptanceCounts) -> None:
        with self._lock:
            self._acceptance.merge(counts)

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
            acceptance, self._acceptance = self._acceptance, AcceptanceCounts()
        try:
            pipe = self._client.pipeline(transaction=False)
            for s in samples:
                pipe.xadd(self.latency_key, {"role": s.role, "replica": s.replica, "batch": s.batch_size,
                                             "tokens": s.tokens_per_seq, "ms": round(s.ms, 3)},
                          maxlen=self.latency_cap, approximate=False)
            if not acceptance.empty():
                pipe.xadd(self.acceptance_key, _acceptance_fields(acceptance, self.replica),
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


def _acceptance_fields(counts: AcceptanceCounts, replica: str) -> dict[str, str | int]:
    return {"replica": replica, "steps": counts.sequence_steps, "accepted": counts.accepted,
            "rejections": counts.rejections, "misses": counts.misses,
            "sibling_accepted": counts.sibling_accepted, "sibling_tried": counts.sibling_tried,
            "proposed_by_position": ",".join(map(str, counts.proposed_by_position)),
            "accepted_by_position": ",".join(map(str, counts.accepted_by_position))}


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
        self._acceptance: deque[AcceptanceCounts] = deque(maxlen=acceptance_window)
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
                self._latency.append((f[b"replica"].decode(), CostSample(
                    f[b"role"].decode(), int(f[b"batch"]), float(f[b"tokens"]), float(f[b"ms"]))))
            except (KeyError, ValueError):  # another version's or a hand-written entry: skip it
                continue
        for _, f in acceptance_entries:
            self._acceptance.append(AcceptanceCounts(int(f[b"steps"]), int(f[b"accepted"]), int(f[b"rejections"]),
                                                     _ints(f[b"proposed_by_position"]),
                                                     _ints(f[b"accepted_by_position"]), int(f.get(b"misses", 0)),
                                                     int(f.get(b"sibling_accepted", 0)),
                                                     int(f.get(b"sibling_tried", 0))))
        alive = {replica for replicas in live.values() for replica in replicas}
        acceptance = AcceptanceCounts()
        for counts in self._acceptance:
            acceptance.merge(counts)
        return FleetView([sample for replica, sample in self._latency if replica in alive], acceptance, live)

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


def is_prefill(new_tokens: list[int]) -> bool:
    """A call that (re)sends a whole prompt costs what the prompt costs: keep it out of the step-cost model."""
    return len(new_tokens) > PREFILL_TOKENS


def replica_name(role: str, port: int) -> str:
    """How this process names itself in telemetry: the pod name in Kubernetes, else host:port."""
    return os.environ.get("SPECFLEET_REPLICA") or os.environ.get("POD_NAME") or f"{role}@{socket.gethostname()}:{port}"


def writer_for(url: str, role: str, port: int, prefix: str) -> TelemetryWriter | None:
    return TelemetryWriter(url, role=role, replica=replica_name(role, port), prefix=prefix) if url else None
