"""Reliability under faults and bad input: a local deployment is killed, drained, fuzzed and flooded while it serves.

The harness starts its own deployment on loopback: redis-server, two SmolLM2-135M targets (``a`` and ``b``), an
``ngram`` draft, a router over both targets (``--depth auto`` unless ``--depth`` says otherwise) and a plain
reference router (``--depth 0``, over target ``b``, which no scenario signals) whose greedy outputs are the
expected ones. Scenarios start what else they need. Greedy streams ask for ``--new-tokens`` tokens past EOS, so
every stream has one length and one right answer, checked token for token.

Scenarios (``--only`` takes their names or numbers):

1. ``kill9``: ``kill -9`` of target ``a`` while ``--streams`` streams run; then as many new requests; then ``a``
   is started again and must rejoin (the router's ``GetServerInfo`` lists both targets), and as many again.
2. ``drain-target``: SIGTERM to ``a`` during the streams: it finishes what it holds while new requests go to
   ``b``; then it is started again and must rejoin.
3. ``drain-lone``: SIGTERM to a third target serving a router of its own, alone: every stream finishes within
   the target's drain timeout.
4. ``drain-router``: SIGTERM to the router during the streams: every stream finishes (the router drains); a
   fresh router serves the scenarios after it.
5. ``fuzz``: ``--fuzz`` requests of random mixes of bad and odd parameters through the gRPC API (and random bytes
   as the message, duplicate ids, aborts of unknown ids), some through the OpenAI HTTP API; the bar is no
   UNKNOWN, INTERNAL or HTTP 5xx answer, and the greedy answers unchanged afterwards.
6. ``overload``: 200 requests at once against a router with ``--max-queue 8`` over a target of 2 slots: the
   RESOURCE_EXHAUSTED rejections must come fast (p99 under 50 ms) and every admitted request must complete. To
   tell the parts apart, up to 20 more requests go one at a time while the queue is still full (what one
   rejection costs alone), the same burst goes to a bare grpc.aio server that refuses every call
   (``bench.refusing_server``: the transport's floor on this machine), and 200 ``GetServerInfo`` calls, which do
   no work, go at once (what a burst costs).
7. ``gaps``: 4 ordinary greedy streams, alone, then beside two clients that start once the streams are under
   way: one sends a 4 MiB prompt (within the router's ``--max-prompt-bytes``, raised to 8 MiB where the router
   has that flag: it is tokenised, then refused as longer than the context) and then a 12 MiB one (over it);
   the other a request with 16 stop strings of 256 characters (the default limits; it generates beside the
   streams) and then one with 1000 of 1000 (over them). Three rounds, alone and beside in turn: the worst gap
   between two messages of a stream beside them may exceed the worst alone by 200 ms at most.

Columns: requests sent, failed (an error where none was due, or a stream cut short; for the fuzz, a status that
is not an answer to bad input: UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, HTTP 5xx), wrong outputs
(greedy outputs not token-identical to the reference), worst stream gap (the longest time between two successive
messages of one stream), statuses (count per gRPC status code; HTTP ones as ``HTTP <code>``) and the bar.
Every process the harness starts is stopped at the end, on Ctrl-C and on errors too.

    python -m bench.chaos                                  # all seven scenarios
    python -m bench.chaos --only kill9 fuzz --fuzz 200     # two of them, a shorter fuzz
    python -m bench.chaos --log-dir /tmp/chaos-logs --json /tmp/chaos.json

Each target runs with one torch thread (``--target-threads``): up to three targets share the machine with the
router, the draft and the clients, and torch's default of a thread per core would have them spin against each
other. The load average before and after is printed with the table: other work on the machine shows in gaps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.chaos_fuzz import FuzzCase, HttpCall, fuzz_cases
from specfleet.client import make_request, server_info, stream
from specfleet.launcher import Deployment, Process, free_port, wait_redis, wait_serving
from specfleet.protos import generate_pb2, generate_pb2_grpc

PROMPTS = ["def add(a, b):", "The capital of France is", "1, 2, 3, 4,", "Once upon a time",
           "import numpy as np", "Dear team,", "SELECT * FROM", "The quick brown fox"]
STREAM_TIMEOUT_S = 600.0  # a deadline far past any healthy stream here: hitting it is a hang, not slowness
DRAIN_TIMEOUT_S = 60.0  # every service's --drain-timeout-s (the default, stated so the bar can name it)
REJOIN_TIMEOUT_S = 180.0
SERVICE = "/specfleet.v1.GenerationService/"
FAULT_STATUSES = frozenset({"UNKNOWN", "INTERNAL", "DATA_LOSS", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED",
                            "TRANSPORT"})
GAP_BAR_MS = 200.0
FUZZ_CONCURRENCY = 8  # fuzzed calls in flight at once: a busy router, not a flood (scenario 6 is the flood)
REJECTION_P99_BAR_MS = 50.0


# --- measuring -------------------------------------------------------------------------------------------------


def worst_gap_ms(arrivals: Sequence[float]) -> float:
    """The longest time between two successive messages, in ms (0 for fewer than two). The wait for the first
    message is not a gap: it is time to first token."""
    return max((b - a for a, b in zip(arrivals, arrivals[1:], strict=False)), default=0.0) * 1000.0


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``: a value that was measured, never one
    interpolated between two."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100.0 * len(ordered)) - 1)]


@dataclass
class StreamRun:
    """One streamed request as its client saw it."""

    tokens: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each message
    status: str = "OK"
    finish_reason: int = generate_pb2.FINISH_REASON_UNSPECIFIED
    ended_at: float = 0.0

    @property
    def gap_ms(self) -> float:
        return worst_gap_ms(self.arrivals)

    @property
    def worst_gap_end(self) -> float | None:
        """When the message that ended the worst gap came."""
        if len(self.arrivals) < 2:
            return None
        return max(zip(self.arrivals, self.arrivals[1:], strict=False), key=lambda ab: ab[1] - ab[0])[1]


def run_stream(address: str, request: generate_pb2.GenerateRequest, started: threading.Event | None = None
               ) -> StreamRun:
    """Streams ``request`` to the end, timing each message; ``started`` is set at the first message (or the
    end, so that nobody waits on a stream that failed)."""
    run = StreamRun()
    try:
        for message in stream(address, request, timeout_s=STREAM_TIMEOUT_S):
            run.arrivals.append(time.monotonic())
            run.tokens.extend(message.token_ids)
            run.finish_reason = message.finish_reason
            if started is not None:
                started.set()
    except grpc.RpcError as err:
        run.status = err.code().name
    finally:
        run.ended_at = time.monotonic()
        if started is not None:
            started.set()
    return run


class Streams:
    """Greedy streams on the pool's threads, one per request."""

    def __init__(self, pool: ThreadPoolExecutor, address: str, requests: list[generate_pb2.GenerateRequest]) -> None:
        self.started = [threading.Event() for _ in requests]
        self.futures = [pool.submit(run_stream, address, r, e) for r, e in zip(requests, self.started, strict=True)]

    def wait_started(self, timeout_s: float = 300.0) -> bool:
        deadline = time.monotonic() + timeout_s
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in self.started)

    def any_running(self) -> bool:
        return not all(f.done() for f in self.futures)

    def results(self) -> list[StreamRun]:
        return [f.result() for f in self.futures]


def grpc_status(call: Callable[[], object], details: dict[str, str] | None = None) -> str:
    """The status code's name of ``call`` ("OK" if it returned); the first details of each code go to
    ``details``."""
    try:
        call()
        return "OK"
    except grpc.RpcError as err:
        if details is not None:
            details.setdefault(err.code().name, (err.details() or "")[:300])
        return err.code().name


def eventually(condition: Callable[[], bool], timeout_s: float) -> float | None:
    """Seconds until ``condition`` held, polled every 0.2 s; None if it did not within ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if condition():
                return time.monotonic() - start
        except grpc.RpcError:
            pass  # asked too early: the router is starting or stopping
        time.sleep(0.2)
    return None


def target_addresses(router: str) -> list[str]:
    return sorted(server_info(router).target_addresses)


# --- results ---------------------------------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    """One scenario's row: what was sent, what went wrong, the bars it was held to and what else it measured."""

    name: str
    requests: int = 0
    failed: int = 0
    wrong: int | None = None  # None: nothing to compare with
    worst_gap_ms: float | None = None
    statuses: Counter = field(default_factory=Counter)
    checks: dict[str, bool] = field(default_factory=dict)  # each bar, and whether it was met
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    raw: dict = field(default_factory=dict)

    def check(self, bar: str, met: bool) -> bool:
        self.checks[bar] = bool(met)
        return bool(met)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def add_streams(self, runs: list[StreamRun], expected: list[list[int]] | None, new_tokens: int) -> None:
        """Counts greedy streams: failed if cut short or refused, wrong if whole but not the reference's tokens."""
        for i, run in enumerate(runs):
            self.requests += 1
            self.statuses[run.status] += 1
            self.worst_gap_ms = max(self.worst_gap_ms or 0.0, run.gap_ms)
            if run.status != "OK" or len(run.tokens) != new_tokens:
                self.failed += 1
            elif expected is not None:
                self.wrong = (self.wrong or 0) + (run.tokens != expected[i])

    @property
    def passed(self) -> bool | None:
        return all(self.checks.values()) if self.checks else None

    def to_json(self) -> dict:
        return {**asdict(self), "statuses": dict(self.statuses), "passed": self.passed}

    def bar_cell(self) -> str:
        if self.passed is None:
            return "-"
        missed = [bar for bar, met in self.checks.items() if not met]
        return "pass" if not missed else "FAIL: " + "; ".join(missed)


def statuses_cell(statuses: Counter) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(statuses.items(), key=lambda kv: (-kv[1], kv[0])))


def table(results: list[ScenarioResult]) -> str:
    lines = ["| scenario | requests | failed | wrong outputs | worst stream gap, ms | statuses | bar | notes |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r in results:
        gap = "-" if r.worst_gap_ms is None else f"{r.worst_gap_ms:.0f}"
        wrong = "-" if r.wrong is None else str(r.wrong)
        lines.append(f"| {r.name} | {r.requests} | {r.failed} | {wrong} | {gap} | {statuses_cell(r.statuses)} | "
                     f"{r.bar_cell()} | {'; '.join(r.notes)} |")
    return "\n".join(lines)


# --- the deployment --------------------------------------------------------------------------------------------


@dataclass
class Service:
    """How to start one named service, so that it can be started again at the same address."""

    role: str
    args: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    process: Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.popen.poll() is None


class ChaosFleet:
    """The services of a run, started on first use; every one is stopped with the ``Deployment``."""

    def __init__(self, deployment: Deployment, log_level: str, depth: str, target_threads: int) -> None:
        self.deployment = deployment
        self.log_level = log_level
        self.depth = depth
        # Several targets share few cores: one torch thread each keeps them from spinning against each other.
        self.target_env = {"OMP_NUM_THREADS": str(target_threads)} if target_threads else {}
        self.services: dict[str, Service] = {}
        self.redis_url = ""
        self.http_ports: dict[str, int] = {}

    def start(self, name: str) -> str:
        """Starts (or starts again) service ``name`` at its address and waits until it serves."""
        service = self.services[name]
        argv = [sys.executable, "-m", "specfleet.cli", service.role, *service.args, "--port", str(service.port),
                "--log-level", self.log_level, "--drain-timeout-s", str(DRAIN_TIMEOUT_S)]
        if self.redis_url:
            argv += ["--redis-url", self.redis_url]
        service.process = self.deployment.start(name, argv, env=service.env)
        wait_serving(service.process, service.address, timeout_s=1800)
        return service.address

    def ensure(self, name: str, role: str, args: list[str], env: dict[str, str] | None = None) -> str:
        """Service ``name``'s address, started now if it is not running (a stopped one starts at a new port)."""
        service = self.services.get(name)
        if service is not None and service.alive:
            return service.address
        if service is None or service.process is not None:
            self.services[name] = Service(role, args, free_port(), env or {})
        return self.start(name)

    def ensure_redis(self) -> None:
        if not self.redis_url:
            port = free_port()
            wait_redis(self.deployment.start_redis(port), port)
            self.redis_url = f"redis://127.0.0.1:{port}/0"

    def target(self, name: str, slots: int = 16) -> str:
        self.ensure_redis()
        return self.ensure(name, "target", ["--model", "smollm2-135m", "--num-slots", str(slots),
                                            "--max-seq-len", "2048"], self.target_env)

    def draft(self) -> str:
        self.ensure_redis()
        return self.ensure("draft", "draft", ["--drafter", "ngram"])

    def router(self, name: str, targets: list[str], *extra: str, depth: str | None = None, http: bool = False
               ) -> str:
        """A router over the named targets, drafting with the ngram draft unless its depth is 0."""
        if name in self.services and self.services[name].alive:
            return self.services[name].address
        addresses = ",".join(self.target(t) for t in targets)
        depth = depth or self.depth
        args = ["--targets", addresses, "--drafts", "" if depth == "0" else self.draft(), "--depth", depth, *extra]
        if http:
            self.http_ports[name] = free_port()
            args += ["--http-port", str(self.http_ports[name])]
        return self.ensure(name, "router", args)

    def main_router(self) -> str:
        return self.router("main", ["a", "b"], http=True)

    def reference_router(self) -> str:
        return self.router("reference", ["b"], depth="0")

    def process(self, name: str) -> Process:
        process = self.services[name].process
        assert process is not None, f"{name} was never started"
        return process

    def stop(self, name: str) -> None:
        """SIGTERM, then SIGKILL if it does not drain in time."""
        popen = self.process(name).popen
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(DRAIN_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


def router_flags() -> set[str]:
    """The router's command-line flags, as its ``--help`` lists them (limits came in later versions)."""
    out = subprocess.run([sys.executable, "-m", "specfleet.cli", "router", "--help"], capture_output=True, text=True,
                         check=True).stdout
    return {word.strip("[],") for word in out.split() if word.startswith(("--", "[--"))}


@dataclass
class Context:
    """What every scenario gets: the fleet, a thread pool for clients, the run's settings and the expected
    answers."""

    fleet: ChaosFleet
    pool: ThreadPoolExecutor
    streams: int
    new_tokens: int
    fuzz: int
    seed: int
    _expected: dict[tuple[str, int], list[int]] = field(default_factory=dict)

    def prompts(self, n: int | None = None) -> list[str]:
        n = self.streams if n is None else n
        return [PROMPTS[i % len(PROMPTS)] for i in range(n)]

    def requests(self, tag: str, n: int | None = None) -> list[generate_pb2.GenerateRequest]:
        return [make_request(p, request_id=f"{tag}-{i}", max_new_tokens=self.new_tokens, ignore_eos=True)
                for i, p in enumerate(self.prompts(n))]

    def start_streams(self, address: str, tag: str, n: int | None = None) -> Streams:
        return Streams(self.pool, address, self.requests(tag, n))

    def run_streams(self, address: str, tag: str, n: int | None = None) -> list[StreamRun]:
        return self.start_streams(address, tag, n).results()

    def expected(self, n: int | None = None) -> list[list[int]]:
        """The reference router's greedy answers to the first ``n`` prompts (computed once per prompt)."""
        missing = [p for p in dict.fromkeys(self.prompts(n)) if (p, self.new_tokens) not in self._expected]
        if missing:
            reference = self.fleet.reference_router()
            runs = Streams(self.pool, reference, [make_request(p, max_new_tokens=self.new_tokens, ignore_eos=True)
                                                  for p in missing]).results()
            for prompt, run in zip(missing, runs, strict=True):
                if run.status != "OK" or len(run.tokens) != self.new_tokens:
                    raise RuntimeError(f"the reference router failed on {prompt!r}: {run.status}")
                self._expected[(prompt, self.new_tokens)] = run.tokens
        return [self._expected[(p, self.new_tokens)] for p in self.prompts(n)]


# --- scenarios 1-4: faults -------------------------------------------------------------------------------------


def signal_mid_stream(ctx: Context, result: ScenarioResult, address: str, tag: str, victim: str,
                      sig: signal.Signals) -> tuple[Streams, float]:
    """Starts the streams, sends ``sig`` to ``victim`` once every stream has its first message, and notes whether
    any stream was still running then (if none was, the fault tested nothing). Returns the streams and when."""
    streams = ctx.start_streams(address, tag)
    result.check("streams started", streams.wait_started())
    ctx.fleet.process(victim).popen.send_signal(sig)
    signalled = time.monotonic()
    result.check("streams were under way at the signal", streams.any_running())
    return streams, signalled


def wait_exit(process: Process, timeout_s: float) -> int | None:
    try:
        return process.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def rejoin(ctx: Context, result: ScenarioResult, router: str, name: str) -> None:
    """Starts target ``name`` again at its address and checks that the router lists it again."""
    started = time.monotonic()
    ctx.fleet.start(name)
    joined = eventually(lambda: len(target_addresses(router)) == 2, REJOIN_TIMEOUT_S)
    if result.check(f"{name} rejoins", joined is not None):
        result.note(f"{name} rejoined {time.monotonic() - started:.1f} s after its restart began "
                    f"({joined:.1f} s after it served)")


def kill9(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("1. kill -9 of one of two targets")
    router, expected = ctx.fleet.main_router(), ctx.expected()
    streams, _ = signal_mid_stream(ctx, result, router, "kill9", "a", signal.SIGKILL)
    result.add_streams(streams.results(), expected, ctx.new_tokens)
    survivor = [ctx.fleet.services["b"].address]
    dropped = eventually(lambda: target_addresses(router) == survivor, 60)
    if result.check("router drops the dead target", dropped is not None):
        result.note(f"a dropped {dropped:.1f} s after the streams ended")
    result.add_streams(ctx.run_streams(router, "after-kill9"), expected, ctx.new_tokens)
    rejoin(ctx, result, router, "a")
    result.add_streams(ctx.run_streams(router, "after-rejoin"), expected, ctx.new_tokens)
    return result


def drain_target(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("2. SIGTERM to one of two targets")
    router, expected = ctx.fleet.main_router(), ctx.expected()
    streams, signalled = signal_mid_stream(ctx, result, router, "drain", "a", signal.SIGTERM)
    during = ctx.start_streams(router, "during-drain")  # a drains: these must go to b
    result.add_streams(streams.results(), expected, ctx.new_tokens)
    result.add_streams(during.results(), expected, ctx.new_tokens)
    code = wait_exit(ctx.fleet.process("a"), DRAIN_TIMEOUT_S + 10)
    if result.check("a exits 0 after draining", code == 0):
        result.note(f"a drained and exited in {time.monotonic() - signalled:.1f} s")
    rejoin(ctx, result, router, "a")
    return result


def drain_lone(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("3. SIGTERM to a lone target")
    router = ctx.fleet.router("lone-router", ["lone"])
    expected = ctx.expected()
    streams, signalled = signal_mid_stream(ctx, result, router, "lone", "lone", signal.SIGTERM)
    runs = streams.results()
    result.add_streams(runs, expected, ctx.new_tokens)
    last = max(r.ended_at for r in runs) - signalled
    result.check(f"every stream ends within the drain timeout ({DRAIN_TIMEOUT_S:.0f} s)", last < DRAIN_TIMEOUT_S)
    code = wait_exit(ctx.fleet.process("lone"), DRAIN_TIMEOUT_S + 10)
    result.check("the target exits 0", code == 0)
    result.note(f"last stream ended {last:.1f} s after the signal, the target exited after "
                f"{time.monotonic() - signalled:.1f} s")
    ctx.fleet.stop("lone-router")  # its only target is gone
    return result


def serving(address: str) -> bool:
    """Whether ``address`` says SERVING; a server that drains may refuse the call itself, which says no."""
    try:
        with grpc.insecure_channel(address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
    except grpc.RpcError:
        return False
    return status == health_pb2.HealthCheckResponse.SERVING


def late_request_status(router: str) -> str:
    """The status a new request gets from a router that drains, asked once its health says so (the signal is
    handled on the router's event loop, a moment after it is sent)."""
    if eventually(lambda: not serving(router), 10) is None:
        return "still SERVING"
    return grpc_status(lambda: list(stream(router, make_request("A late request.", max_new_tokens=2),
                                           timeout_s=30)))


def drain_router(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("4. SIGTERM to the router")
    router, expected = ctx.fleet.main_router(), ctx.expected()
    streams, signalled = signal_mid_stream(ctx, result, router, "router-drain", "main", signal.SIGTERM)
    late = late_request_status(router)
    runs = streams.results()
    result.add_streams(runs, expected, ctx.new_tokens)
    code = wait_exit(ctx.fleet.process("main"), DRAIN_TIMEOUT_S + 10)
    result.check("the router exits 0", code == 0)
    result.check("a new request meanwhile is refused (UNAVAILABLE)", late == "UNAVAILABLE")
    result.note(f"last stream ended {max(r.ended_at for r in runs) - signalled:.1f} s after the signal; "
                f"a new request meanwhile: {late}")
    ctx.fleet.main_router()  # a fresh one (at a new address) for the scenarios after this
    return result


# --- scenario 5: fuzz ------------------------------------------------------------------------------------------


def send_raw(channel: grpc.Channel, case: FuzzCase, details: dict[str, str]) -> str:
    identity = lambda b: b  # noqa: E731 - the bytes go out as they are
    if case.method == "GenerateStream":
        call = channel.unary_stream(SERVICE + case.method, request_serializer=identity,
                                    response_deserializer=identity)
        return grpc_status(lambda: list(call(case.raw, timeout=STREAM_TIMEOUT_S)), details)
    call = channel.unary_unary(SERVICE + case.method, request_serializer=identity, response_deserializer=identity)
    return grpc_status(lambda: call(case.raw, timeout=STREAM_TIMEOUT_S), details)


def send_duplicate(stub: generate_pb2_grpc.GenerationServiceStub, request: generate_pb2.GenerateRequest,
                   details: dict[str, str]) -> list[str]:
    """The first request streams; once it is live, a second with its id must be refused (ALREADY_EXISTS)."""
    first = iter(stub.GenerateStream(request, timeout=STREAM_TIMEOUT_S))
    second = "not sent"

    def both() -> None:
        nonlocal second
        next(first)
        second = grpc_status(lambda: stub.Generate(request, timeout=STREAM_TIMEOUT_S), details)
        list(first)

    return [grpc_status(both, details), second]


def send_grpc(address: str, case: FuzzCase, details: dict[str, str]) -> list[str]:
    """The statuses of the calls ``case`` makes, each on a channel of its own (a call that broke its connection
    must not fail the others)."""
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        if case.raw is not None:
            return [send_raw(channel, case, details)]
        if case.abort_id is not None:
            abort = generate_pb2.AbortRequest(request_id=case.abort_id)
            return [grpc_status(lambda: stub.Abort(abort, timeout=30), details)]
        if case.duplicate:
            return send_duplicate(stub, case.request, details)
        if case.streamed:
            return [grpc_status(lambda: list(stub.GenerateStream(case.request, timeout=STREAM_TIMEOUT_S)), details)]
        return [grpc_status(lambda: stub.Generate(case.request, timeout=STREAM_TIMEOUT_S), details)]


def send_http(base_url: str, call: HttpCall, details: dict[str, str]) -> str:
    """``HTTP <status>``; a stream that ends with an error event adds the error's code."""
    try:
        with httpx.Client(base_url=base_url, timeout=STREAM_TIMEOUT_S) as client:
            response = client.request(call.method, call.path, content=call.body,
                                      headers={"content-type": call.content_type})
    except httpx.HTTPError as err:
        details.setdefault("TRANSPORT", repr(err)[:300])
        return "TRANSPORT"
    label = f"HTTP {response.status_code}"
    for line in response.text.splitlines():
        if line.startswith('data: {"error"'):
            label = f"{label}, then error {json.loads(line[6:])['error'].get('code')}"
            break
    if response.status_code != 200 or "error" in label:
        details.setdefault(label, response.text[:300])
    return label


def is_fault(status: str) -> bool:
    """A status that is no answer to bad input: the server broke, hung or went away."""
    if status.startswith("HTTP "):
        code, _, stream_error = status.partition(", then error ")
        return code.startswith("HTTP 5") or stream_error.upper() in FAULT_STATUSES
    return status in FAULT_STATUSES


def fuzz(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("5. fuzzed requests (gRPC and HTTP)")
    router = ctx.fleet.main_router()
    base_url = f"http://127.0.0.1:{ctx.fleet.http_ports['main']}"
    expected = ctx.expected()
    cases = fuzz_cases(random.Random(ctx.seed), ctx.fuzz, vocab=49152)

    def send(case: FuzzCase) -> tuple[list[str], dict[str, str]]:
        details: dict[str, str] = {}
        statuses = [send_http(base_url, case.http, details)] if case.http else send_grpc(router, case, details)
        return statuses, details

    by_kind: dict[str, Counter] = {}
    examples: dict[str, dict[str, str]] = {}  # per kind, the first details of each status
    with client_pool(FUZZ_CONCURRENCY) as pool:
        answers = list(pool.map(send, cases))
    for case, (statuses, details) in zip(cases, answers, strict=True):
        by_kind.setdefault(case.kind, Counter()).update(statuses)
        for status, text in details.items():
            examples.setdefault(case.kind, {}).setdefault(status, text)
        result.statuses.update(statuses)
    result.requests = sum(result.statuses.values())
    result.failed = sum(count for status, count in result.statuses.items() if is_fault(status))
    result.check("no UNKNOWN, INTERNAL or HTTP 5xx (nor a hang or a lost router)", result.failed == 0)
    faulty = sorted({kind for kind, statuses in by_kind.items() if any(is_fault(s) for s in statuses)})
    if faulty:
        result.note("faults from: " + ", ".join(faulty[:8]) + (" ..." if len(faulty) > 8 else ""))
    after = ScenarioResult("greedy answers after the fuzz")
    after.add_streams(ctx.run_streams(router, "after-fuzz"), expected, ctx.new_tokens)
    result.check("greedy answers unchanged afterwards", after.failed == 0 and after.wrong == 0)
    result.wrong, result.worst_gap_ms = after.wrong, after.worst_gap_ms
    result.note(f"then {after.requests} greedy streams: {after.failed} failed, {after.wrong} wrong")
    result.raw["by_kind"] = {kind: dict(statuses) for kind, statuses in sorted(by_kind.items())}
    result.raw["examples"] = examples
    return result


# --- scenario 6: overload --------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One call of a burst: its status, its latency from the client's side, and its reply."""

    status: str
    ms: float
    reply: object = None


Call = Callable[[generate_pb2_grpc.GenerationServiceStub, int], Awaitable]


async def timed(stub: generate_pb2_grpc.GenerationServiceStub, i: int, make_call: Call) -> Answer:
    start = time.perf_counter()
    try:
        reply = await make_call(stub, i)
        return Answer("OK", (time.perf_counter() - start) * 1000.0, reply)
    except grpc.aio.AioRpcError as err:
        return Answer(err.code().name, (time.perf_counter() - start) * 1000.0)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time process ``pid`` has used so far (Linux; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Burst:
    """A burst's answers, the calls sent one at a time after it, and what answering the burst cost: its wall time
    and the CPU time of the router and of this client meanwhile (ms)."""

    answers: list[Answer]
    probed: list[Answer]
    wall_ms: float
    router_cpu_ms: float
    client_cpu_ms: float


async def burst(address: str, router_pid: int, calls: int, make_call: Call, held: int = 0, probes: int = 0,
                channels: int = 10) -> Burst:
    """``calls`` calls at once, spread over ``channels`` connections as separate clients would open them. Once all
    but ``held`` are answered (the router holds those: its queue is full), ``probes`` more calls one at a time,
    each answered before the next (until one is admitted): what one call costs when nothing else is arriving."""
    opened = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    stubs = [generate_pb2_grpc.GenerationServiceStub(channel) for channel in opened]
    try:
        for channel in opened:
            await channel.channel_ready()
        wall, router_cpu, client_cpu = time.perf_counter(), cpu_seconds(router_pid), time.process_time()
        tasks = [asyncio.create_task(timed(stubs[i % channels], i, make_call)) for i in range(calls)]
        deadline = time.monotonic() + 30
        while sum(t.done() for t in tasks) < calls - held and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        wall, router_cpu, client_cpu = (time.perf_counter() - wall, cpu_seconds(router_pid) - router_cpu,
                                        time.process_time() - client_cpu)
        probed: list[Answer] = []
        while len(probed) < probes and (not probed or probed[-1].status != "OK"):  # admitted: the queue has room
            probed.append(await timed(stubs[0], calls + len(probed), make_call))
        return Burst(list(await asyncio.gather(*tasks)), probed, wall * 1000, router_cpu * 1000, client_cpu * 1000)
    finally:
        for channel in opened:
            await channel.close()


def latency_note(what: str, answers: list[Answer], status: str) -> str:
    ms = [a.ms for a in answers if a.status == status]
    return f"{what}: p50 {percentile(ms, 50):.1f} ms, p99 {percentile(ms, 99):.1f} ms"


def cost_note(b: Burst, server: str = "router") -> str:
    return (f"answered in {b.wall_ms:.0f} ms, using {b.router_cpu_ms:.0f} ms of {server} CPU and {b.client_cpu_ms:.0f} "
            "of client CPU")


def refusing_floor(ctx: Context, calls: int, make_call: Call) -> Burst:
    """The burst at `bench.refusing_server`, a bare grpc.aio server in its own process that refuses every call at
    once: what the transport alone costs on this machine, under the router's rejections."""
    port = free_port()
    process = ctx.fleet.deployment.start("refusing-server", [sys.executable, "-m", "bench.refusing_server", "--port",
                                                             str(port)])
    try:
        return asyncio.run(burst(f"127.0.0.1:{port}", process.popen.pid, calls, make_call))
    finally:
        process.popen.terminate()
        process.popen.wait()


def overload(ctx: Context, calls: int = 200, slots: int = 2, queue: int = 8, new_tokens: int = 32,
             probes: int = 20) -> ScenarioResult:
    result = ScenarioResult(f"6. {calls} requests at once, {slots} slots, --max-queue {queue}")
    ctx.fleet.target("slim", slots=slots)
    router = ctx.fleet.router("overload", ["slim"], "--max-queue", str(queue))
    pid = ctx.fleet.process("overload").popen.pid

    def generate(stub: generate_pb2_grpc.GenerationServiceStub, i: int) -> Awaitable:
        return stub.Generate(make_request(PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens, ignore_eos=True),
                             timeout=STREAM_TIMEOUT_S)

    def server_info(stub: generate_pb2_grpc.GenerationServiceStub, i: int) -> Awaitable:
        return stub.GetServerInfo(generate_pb2.GetServerInfoRequest(), timeout=STREAM_TIMEOUT_S)

    asyncio.run(burst(router, pid, slots, generate))  # warm: the router's first requests pay one-off costs
    flood = asyncio.run(burst(router, pid, calls, generate, held=slots + queue, probes=probes))
    floor = refusing_floor(ctx, calls, generate)  # once the admitted requests are done, as the GetServerInfo burst
    every = [*flood.answers, *flood.probed]
    rejected = [a.ms for a in flood.answers if a.status == "RESOURCE_EXHAUSTED"]
    admitted = [a for a in every if a.status != "RESOURCE_EXHAUSTED"]
    result.requests = len(every)
    result.statuses.update(a.status for a in every)
    result.failed = sum(a.status != "OK" or len(a.reply.token_ids) != new_tokens for a in admitted)
    result.check("every admitted request completes", result.failed == 0)
    p99 = percentile(rejected, 99)
    result.check(f"rejection p99 < {REJECTION_P99_BAR_MS:.0f} ms", bool(rejected) and p99 < REJECTION_P99_BAR_MS)
    info = asyncio.run(burst(router, pid, calls, server_info))
    result.note(f"{len(admitted)} admitted; " + "; ".join([
        latency_note("rejections in the burst", flood.answers, "RESOURCE_EXHAUSTED") + f" ({cost_note(flood)})",
        latency_note(f"{len(flood.probed)} more one at a time", flood.probed, "RESOURCE_EXHAUSTED"),
        latency_note("the same burst at a bare grpc.aio server that refuses all (bench.refusing_server)",
                     floor.answers, "RESOURCE_EXHAUSTED") + f" ({cost_note(floor, 'server')})",
        latency_note(f"a burst of {calls} GetServerInfo", info.answers, "OK") + f" ({cost_note(info)})"]))
    result.raw.update(rejection_ms=rejected, probe_ms=[a.ms for a in flood.probed],
                      floor_ms=[a.ms for a in floor.answers], server_info_ms=[a.ms for a in info.answers],
                      costs={name: {k: v for k, v in asdict(b).items() if k.endswith("_ms")}
                             for name, b in (("rejections", flood), ("floor", floor), ("server_info", info))})
    ctx.fleet.stop("overload")
    ctx.fleet.stop("slim")
    return result


# --- scenario 7: stream gaps -----------------------------------------------------------------------------------

MIB = 1 << 20


def big_prompt(n_bytes: int) -> str:
    """Ordinary prose and code, repeated to ``n_bytes`` (what a tokenizer really sees, not one repeated byte)."""
    from bench.prompts import MIXED

    unit = "\n\n".join(MIXED)
    return (unit * (n_bytes // len(unit) + 1))[:n_bytes]


def prompt_disruptors(new_tokens: int) -> list[tuple[str, generate_pb2.GenerateRequest]]:
    """Multi-MiB prompts, within and over an 8 MiB limit; both far over the context once tokenised."""
    return [(f"{mib} MiB prompt", make_request(big_prompt(mib * MIB), max_new_tokens=new_tokens)) for mib in (4, 12)]


def stop_disruptors(new_tokens: int) -> list[tuple[str, generate_pb2.GenerateRequest]]:
    """Stop strings that are checked every step but never met: 16 of 256 characters, and 1000 of 1000."""
    never = "\x01"  # a character SmolLM2 does not produce here
    return [(f"{count} stops x {length}",
             make_request(PROMPTS[1], max_new_tokens=new_tokens, ignore_eos=True,
                          stop=[(never + f"{i:04d}" * length)[:length] for i in range(count)]))
            for count, length in ((16, 256), (1000, 1000))]


@dataclass
class Disruption:
    """One disruptive request: what it was, its status, and when it was sent and answered (time.monotonic())."""

    name: str
    status: str
    sent: float
    answered: float


def disrupt(address: str, requests: list[tuple[str, generate_pb2.GenerateRequest]], pause_s: float
            ) -> list[Disruption]:
    """Sends ``requests`` one after another, ``pause_s`` apart."""
    sent = []
    for name, request in requests:
        start = time.monotonic()
        status = grpc_status(lambda r=request: list(stream(address, r, timeout_s=STREAM_TIMEOUT_S)))
        sent.append(Disruption(name, status, start, time.monotonic()))
        time.sleep(pause_s)
    return sent


def streams_beside(ctx: Context, address: str, tag: str, n: int,
                   disruptors: list[list[tuple[str, generate_pb2.GenerateRequest]]]
                   ) -> tuple[list[StreamRun], list[Disruption]]:
    """``n`` greedy streams; once each has its first message, every disruptor sends its requests beside them."""
    streams = ctx.start_streams(address, tag, n)
    streams.wait_started()
    senders = [ctx.pool.submit(disrupt, address, requests, 1.0) for requests in disruptors]
    runs = streams.results()
    return runs, [d for sender in senders for d in sender.result()]


def gaps(ctx: Context, rounds: int = 3, n: int = 4) -> ScenarioResult:
    result = ScenarioResult(f"7. gaps of {n} streams beside huge inputs")
    limits = ["--max-prompt-bytes", str(8 * MIB)] if "--max-prompt-bytes" in router_flags() else []
    router = ctx.fleet.router("gaps", ["a", "b"], *limits)
    expected = ctx.expected(n)
    # Two clients beside the streams: one sends a big prompt within the limit, then one over it; the other a
    # request with stop strings at the limits (it generates beside the streams), then one far over them.
    disruptors = [prompt_disruptors(ctx.new_tokens), stop_disruptors(ctx.new_tokens)]
    quiet, busy = [], []
    for r in range(rounds):  # alternating, so that a drift of the machine hits both alike
        quiet_runs = ctx.run_streams(router, f"quiet-{r}", n)
        busy_runs, disrupted = streams_beside(ctx, router, f"busy-{r}", n, disruptors)
        for runs, gaps_ms in ((quiet_runs, quiet), (busy_runs, busy)):
            result.add_streams(runs, expected, ctx.new_tokens)
            gaps_ms.extend(run.gap_ms for run in runs)
        result.statuses.update(f"{d.name}: {d.status}" for d in disrupted)
        result.requests += len(disrupted)
        # When each stream's worst gap ended, beside what the disruptive requests did then, to see what caused it.
        result.raw.setdefault("rounds", []).append({
            "quiet_worst_gaps": [(run.gap_ms, run.worst_gap_end) for run in quiet_runs],
            "busy_worst_gaps": [(run.gap_ms, run.worst_gap_end) for run in busy_runs],
            "disruptions": [asdict(d) for d in disrupted]})
    worst_quiet, worst_busy = max(quiet), max(busy)
    result.worst_gap_ms = worst_busy
    result.check(f"worst gap beside them <= alone + {GAP_BAR_MS:.0f} ms", worst_busy <= worst_quiet + GAP_BAR_MS)
    result.check("0 failed, 0 wrong", result.failed == 0 and not result.wrong)
    result.note(f"worst gap alone {worst_quiet:.0f} ms, beside them {worst_busy:.0f} ms "
                f"(median stream's worst: {statistics.median(quiet):.0f} / {statistics.median(busy):.0f} ms); "
                f"router limits: {' '.join(limits) or 'none (no --max-prompt-bytes)'}")
    result.raw.update(quiet_gaps_ms=quiet, busy_gaps_ms=busy)
    ctx.fleet.stop("gaps")
    return result


# --- running ---------------------------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[Context], ScenarioResult]] = {
    "kill9": kill9, "drain-target": drain_target, "drain-lone": drain_lone, "drain-router": drain_router,
    "fuzz": fuzz, "overload": overload, "gaps": gaps}


def scenario_names(chosen: Sequence[str]) -> list[str]:
    """``--only``'s names or numbers, in the harness's order."""
    names = list(SCENARIOS)
    picked = {names[int(c) - 1] if c.isdigit() else c for c in chosen}
    unknown = picked - set(names)
    if unknown:
        raise SystemExit(f"unknown scenario(s) {sorted(unknown)}; choose from {names} or 1-{len(names)}")
    return [n for n in names if n in picked]


@contextmanager
def client_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """Client threads; on the way out (Ctrl-C included) calls not yet started are dropped, not sent."""
    pool = ThreadPoolExecutor(workers)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT unwind as Ctrl-C does, so that every process started is stopped either way (SIGINT too:
    a shell starts background jobs with it ignored)."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_scenarios(names: list[str], ctx: Context) -> list[ScenarioResult]:
    results = []
    for name in names:
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            result = SCENARIOS[name](ctx)
        except Exception as err:  # noqa: BLE001 - one broken scenario must not hide the others' rows
            result = ScenarioResult(name)
            result.check("ran to the end", False)
            result.note(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        result.seconds = time.monotonic() - started
        print(table([result]).splitlines()[-1], f"({result.seconds:.0f} s)", flush=True)
        results.append(result)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="SCENARIO", default=list(SCENARIOS),
                        help=f"scenarios to run, by name or number ({', '.join(SCENARIOS)}; default: all)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent greedy streams in scenarios 1-4")
    parser.add_argument("--new-tokens", type=int, default=96,
                        help="tokens per greedy stream (past EOS): long enough to be mid-stream at the fault")
    parser.add_argument("--fuzz", type=int, default=1000, help="fuzzed calls in scenario 5")
    parser.add_argument("--depth", default="auto", help="the router's --depth: auto or a fixed K")
    parser.add_argument("--target-threads", type=int, default=1,
                        help="OMP_NUM_THREADS of each target (0: torch's default); the targets share the cores")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fuzzed requests")
    parser.add_argument("--log-dir", type=Path, help="keep the services' logs (at INFO) here")
    parser.add_argument("--json", type=Path, help="write every scenario's raw results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    names = scenario_names(args.only)
    started, load_before = time.monotonic(), os.getloadavg()
    with (signals_as_interrupt(), tempfile.TemporaryDirectory() as tmp,
          client_pool(64) as pool, Deployment(args.log_dir or Path(tmp)) as deployment):
        fleet = ChaosFleet(deployment, "WARNING" if args.log_dir is None else "INFO", args.depth,
                           args.target_threads)
        ctx = Context(fleet, pool, args.streams, args.new_tokens, args.fuzz, args.seed)
        results = run_scenarios(names, ctx)
    load = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(load_before, os.getloadavg(), strict=True))
    print(f"\n{table(results)}\n\n{len(names)} scenario(s) in {time.monotonic() - started:.0f} s; load average "
          f"(1, 5, 15 min) before/after: {load}", flush=True)
    if args.json:
        args.json.write_text(json.dumps([r.to_json() for r in results], indent=1))


if __name__ == "__main__":
    main()
