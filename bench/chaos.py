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
   RESOURCE_EXHAUSTED rejections must come fast (p99 under 50 ms) and every admitted request must complete.
   The same burst of ``GetServerInfo`` calls, which do no work, measures what the burst alone costs.
7. ``gaps``: 4 ordinary greedy streams, alone and then beside requests with multi-MiB prompts (within and over
   the router's ``--max-prompt-bytes`` where it has that flag) and with many long stop strings, in alternating
   rounds: the disruptive requests may add at most 200 ms to the worst gap between two messages of a stream.

Columns: requests sent, failed (an error where none was due, or a stream cut short; for the fuzz, a status that
is not an answer to bad input: UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, HTTP 5xx), wrong outputs
(greedy outputs not token-identical to the reference), worst stream gap (the longest time between two successive
messages of one stream), statuses (count per gRPC status code; HTTP ones as ``HTTP <code>``) and the bar.
Every process the harness starts is stopped at the end, on Ctrl-C and on errors too.

    python -m bench.chaos                                  # all seven scenarios
    python -m bench.chaos --only kill9 fuzz --fuzz 200     # two of them, a shorter fuzz
    python -m bench.chaos --log-dir /tmp/chaos-logs --json /tmp/chaos.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
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

from specfleet.client import make_request, stream
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
    with grpc.insecure_channel(router) as channel:
        info = generate_pb2_grpc.GenerationServiceStub(channel).GetServerInfo(generate_pb2.GetServerInfoRequest(),
                                                                              timeout=10)
    return sorted(info.target_addresses)


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


@dataclass
class HttpCall:
    method: str
    path: str
    body: bytes = b""
    content_type: str = "application/json"


@dataclass
class FuzzCase:
    """One fuzzed call: a request (streamed or not), raw bytes to a method, an abort, a duplicate id or an HTTP
    call. ``kind`` names what it tries."""

    kind: str
    request: generate_pb2.GenerateRequest | None = None
    streamed: bool = False
    duplicate: bool = False
    raw: bytes | None = None
    method: str = ""
    abort_id: str | None = None
    http: HttpCall | None = None


ODD_TEXT = ["", " ", "\x00", "\n" * 50, "é" * 100, "🙂" * 50, "\u202e\u0301" * 20, "<|im_start|>", "</s>" * 10,
            "a" * 5000]


def odd_text(rng: random.Random) -> str:
    return rng.choice(ODD_TEXT) if rng.random() < 0.5 else "".join(chr(rng.randint(32, 0x2FFF))
                                                                   for _ in range(rng.randint(1, 64)))


def base_request(rng: random.Random, vocab: int) -> generate_pb2.GenerateRequest:
    """A valid, cheap greedy request with a prompt of a random kind."""
    kind = rng.choice(["text", "token_ids", "chat"])
    if kind == "text":
        request = make_request(rng.choice(PROMPTS))
    elif kind == "token_ids":
        request = make_request([rng.randrange(vocab) for _ in range(rng.randint(1, 32))])
    else:
        request = make_request(chat=[{"role": "user", "content": rng.choice(PROMPTS)}])
    request.stopping.max_new_tokens = rng.randint(1, 4)
    return request


def mutate_prompt_empty(rng: random.Random, r: generate_pb2.GenerateRequest, vocab: int) -> str:
    choice = rng.choice(["text", "ids", "chat", "none", "chat-empty-content"])
    if choice == "text":
        r.text = ""
    elif choice == "ids":
        r.token_ids.SetInParent()
        del r.token_ids.ids[:]
    elif choice == "chat":
        r.chat.SetInParent()
        del r.chat.messages[:]
    elif choice == "none":
        r.ClearField("prompt")
    else:
        r.chat.messages.add(role="user", content="")
    return "empty prompt"


def mutate_max_new_tokens(rng: random.Random, r: generate_pb2.GenerateRequest, vocab: int) -> str:
    r.stopping.max_new_tokens = rng.choice([0, -1, -(2**31), 4097, 10**6, 2**31 - 1])
    return "max_new_tokens out of range"


def mutate_out_of_vocab(rng: random.Random, r: generate_pb2.GenerateRequest, vocab: int) -> str:
    ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
    ids.insert(rng.randint(0, len(ids)), rng.choice([vocab, vocab + 1, 2**31, 2**32 - 1]))
    r.token_ids.ids[:] = ids
    return "token id out of vocabulary"


def mutate_chat_role(rng: random.Random, r: generate_pb2.GenerateRequest, vocab: int) -> str:
    r.chat.messages.add(role=rng.choice(["tool", "", "SYSTEM", "function", "\x00", "user ", odd_text(rng)]),
                        content=odd_text(rng))
    return "unknown chat role"


def mutate_odd_chat(rng: random.Random, r: generate_pb2.GenerateRequest, vocab: int) -> str:
    for _ in range(rng.randint(1, 40)):
        r.chat.messages.add(role=rng.choice(["system", "user", "assistant"]), content=odd_text(rng))
    return "odd chat"


def mutate_temperature(rng: random.Random, r: generate_pb2.GenerateRequest, vocab: int) -> str:
    r.sampling.temperature = rng.choice([math.nan, -1.0, -0.0, math.inf, -math.inf, 1e-45, 1e30, 3.0])
    return "odd temperature"


def mutate_top_p(rng: random.Random, r: generate_pb2.GenerateRequest, vocab: int) -> str:
    r.sampling.top_p = rng.choice([0.0, -0.5, 1.5, math.nan, math.inf, 1e-30])
    r.sampling.temperature = rng.choice([0.0, 1.0])
    return "odd top_p"


def mutate_top_k(rng: random.Random, r: generate_pb2.GenerateRequest, vocab: int) -> str:
    r.sampling.top_k = rng.choice([-1, -(2**31), 1, vocab, vocab + 1, 2**31 - 1])
    r.sampling.temperature = rng.choice([0.0, 1.0])
    return "odd top_k"


def mutate_seed(rng: random.Random, r: generate_pb2.GenerateRequest, vocab: int) -> str:
    r.sampling.seed = rng.choice([0, 2**63 - 1, 2**63, 2**64 - 1])
    r.sampling.temperature = 1.0
    return "odd seed"


def mutate_stops(rng: random.Random, r: generate_pb2.GenerateRequest, vocab: int) -> str:
    count, length = rng.choice([(1, 0), (17, 8), (200, 64), (2000, 16), (3, 100_000), (64, 4096)])
    r.stopping.stop.extend(odd_text(rng)[:1] + "x" * length for _ in range(count))
    return "many or long stop strings"


def mutate_long_prompt(rng: random.Random, r: generate_pb2.GenerateRequest, vocab: int) -> str:
    choice = rng.choice(["text", "ids", "ids-fits", "chat"])
    if choice == "text":
        r.text = "lorem ipsum dolor " * rng.choice([2_000, 60_000])
    elif choice == "ids":
        r.token_ids.ids[:] = [rng.randrange(vocab) for _ in range(rng.choice([2048, 5000, 100_000]))]
    elif choice == "ids-fits":  # just inside the context: a real prefill of ~2000 tokens
        r.token_ids.ids[:] = [rng.randrange(vocab) for _ in range(2040)]
    else:
        r.chat.messages.add(role="user", content="word " * 50_000)
    return "very long prompt"


def mutate_request_id(rng: random.Random, r: generate_pb2.GenerateRequest, vocab: int) -> str:
    r.request_id = rng.choice(["\x00", "x" * 100_000, odd_text(rng), " "])
    return "odd request id"


def mutate_ignore_eos(rng: random.Random, r: generate_pb2.GenerateRequest, vocab: int) -> str:
    r.stopping.ignore_eos = True
    return "ignore_eos"


MUTATIONS = [mutate_prompt_empty, mutate_max_new_tokens, mutate_out_of_vocab, mutate_chat_role, mutate_odd_chat,
             mutate_temperature, mutate_top_p, mutate_top_k, mutate_seed, mutate_stops, mutate_long_prompt,
             mutate_request_id, mutate_ignore_eos]


def mixed_case(rng: random.Random, vocab: int) -> FuzzCase:
    """A valid request with 0-3 random mutations (none now and then: valid requests must go on working)."""
    request = base_request(rng, vocab)
    kinds = [mutation(rng, request, vocab) for mutation in rng.sample(MUTATIONS, rng.choice([0, 1, 1, 2, 2, 3]))]
    return FuzzCase(" + ".join(sorted(kinds)) or "valid", request=request, streamed=rng.random() < 0.5)


def raw_case(rng: random.Random, vocab: int) -> FuzzCase:
    """Bytes that are not the method's message: random, or a valid request cut short."""
    method = rng.choice(["Generate", "GenerateStream", "Abort", "GetServerInfo"])
    if rng.random() < 0.5:
        data = rng.randbytes(rng.choice([1, 7, 64, 4096]))
        kind = "random bytes"
    else:
        whole = base_request(rng, vocab).SerializeToString()
        data = whole[:rng.randrange(1, len(whole))]
        kind = "truncated message"
    return FuzzCase(f"{kind} to {method}", raw=data, method=method)


def abort_case(rng: random.Random, vocab: int) -> FuzzCase:
    return FuzzCase("abort of an unknown id", abort_id=rng.choice(["", "nope", odd_text(rng), "x" * 10_000]))


def duplicate_case(rng: random.Random, vocab: int) -> FuzzCase:
    request = base_request(rng, vocab)
    request.request_id = f"dup-{rng.randrange(2**32)}"
    request.stopping.max_new_tokens = 16
    request.stopping.ignore_eos = True
    return FuzzCase("duplicate request id", request=request, duplicate=True)


def valid_chat_body(rng: random.Random) -> dict:
    return {"model": "smollm2-135m", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": 2, "temperature": 0}


HTTP_WRONG_TYPES = {"messages": "hello", "max_tokens": "ten", "temperature": "hot", "stop": 5, "n": "two",
                    "stream": "yes", "model": 5, "top_p": [1], "seed": 1.5, "top_k": {}, "stream_options": 1}
HTTP_ODD_VALUES = {"max_tokens": [-1, 0, 10**20], "temperature": [-1, 1e309], "top_p": [0, 2], "top_k": [-1, 10**20],
                   "seed": [-1, 2**64, 2**70], "n": [2, 5, 0], "stop": [["x" * 1000] * 100, [""]],
                   "logit_bias": [{"1": 100}], "logprobs": [True], "ignore_eos": [True]}
HTTP_BAD_BODIES = [b"{", b"", b"null", b"[]", b'"text"', b"{\"model\": NaN}", b"\xff\xfe\x00",
                   b"[" * 100_000 + b"]" * 100_000]


def http_case(rng: random.Random, vocab: int) -> FuzzCase:
    """A call to the OpenAI API: bad JSON, wrong types, odd values, another model, or a wrong path or method."""
    choice = rng.choice(["bad-json", "wrong-type", "odd-value", "odd-value", "model", "path", "completion"])
    body = valid_chat_body(rng)
    path = "/v1/chat/completions"
    if choice == "bad-json":
        return FuzzCase("HTTP bad JSON", http=HttpCall("POST", path, rng.choice(HTTP_BAD_BODIES)))
    if choice == "wrong-type":
        key = rng.choice(sorted(HTTP_WRONG_TYPES))
        body[key] = HTTP_WRONG_TYPES[key]
    elif choice == "odd-value":
        key = rng.choice(sorted(HTTP_ODD_VALUES))
        body[key] = rng.choice(HTTP_ODD_VALUES[key])
        body["stream"] = rng.random() < 0.5
    elif choice == "model":
        body["model"] = rng.choice(["gpt-4", "", "smollm2-135m " * 3])
    elif choice == "path":
        method, path = rng.choice([("GET", path), ("POST", "/v1/nothing"), ("PUT", "/v1/models"), ("POST", "/")])
        return FuzzCase(f"HTTP {method} {path}", http=HttpCall(method, path, json.dumps(body).encode()))
    else:
        path = "/v1/completions"
        body = {"model": "smollm2-135m", "max_tokens": 2, "temperature": 0,
                "prompt": rng.choice([[[vocab]], [-1], [], [[1, 2], [3]], "", ["a", "b"], 3.5])}
    kind = f"HTTP {choice}" + (f" {key}" if choice in ("wrong-type", "odd-value") else "")
    return FuzzCase(kind, http=HttpCall("POST", path, json.dumps(body).encode()))


def fuzz_cases(rng: random.Random, n: int, vocab: int) -> list[FuzzCase]:
    """``n`` cases: mostly mixed gRPC requests, the rest raw bytes, aborts, duplicate ids and HTTP calls."""
    makers = [(mixed_case, 0.55), (raw_case, 0.1), (abort_case, 0.05), (duplicate_case, 0.05), (http_case, 0.25)]
    return [rng.choices([m for m, _ in makers], [w for _, w in makers])[0](rng, vocab) for _ in range(n)]


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


async def burst(address: str, calls: int, make_call: Call, held: int = 0, probes: int = 0, channels: int = 10
                ) -> tuple[list[Answer], list[Answer]]:
    """``calls`` calls at once, spread over ``channels`` connections as separate clients would open them. Once all
    but ``held`` are answered (the router holds those: its queue is full), ``probes`` more calls one at a time,
    each answered before the next (until one is admitted): what one call costs when nothing else is arriving."""
    opened = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    stubs = [generate_pb2_grpc.GenerationServiceStub(channel) for channel in opened]
    try:
        for channel in opened:
            await channel.channel_ready()
        tasks = [asyncio.create_task(timed(stubs[i % channels], i, make_call)) for i in range(calls)]
        deadline = time.monotonic() + 30
        while sum(t.done() for t in tasks) < calls - held and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        probed: list[Answer] = []
        while len(probed) < probes and (not probed or probed[-1].status != "OK"):  # admitted: the queue has room
            probed.append(await timed(stubs[0], calls + len(probed), make_call))
        return list(await asyncio.gather(*tasks)), probed
    finally:
        for channel in opened:
            await channel.close()


def latency_note(what: str, answers: list[Answer], status: str) -> str:
    ms = [a.ms for a in answers if a.status == status]
    return f"{what}: p50 {percentile(ms, 50):.1f} ms, p99 {percentile(ms, 99):.1f} ms"


def overload(ctx: Context, calls: int = 200, slots: int = 2, queue: int = 8, new_tokens: int = 32,
             probes: int = 20) -> ScenarioResult:
    result = ScenarioResult(f"6. {calls} requests at once, {slots} slots, --max-queue {queue}")
    ctx.fleet.target("slim", slots=slots)
    router = ctx.fleet.router("overload", ["slim"], "--max-queue", str(queue))

    def generate(stub: generate_pb2_grpc.GenerationServiceStub, i: int) -> Awaitable:
        return stub.Generate(make_request(PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens, ignore_eos=True),
                             timeout=STREAM_TIMEOUT_S)

    def server_info(stub: generate_pb2_grpc.GenerationServiceStub, i: int) -> Awaitable:
        return stub.GetServerInfo(generate_pb2.GetServerInfoRequest(), timeout=STREAM_TIMEOUT_S)

    asyncio.run(burst(router, slots, generate))  # warm: the router's first requests pay one-off costs
    answers, probed = asyncio.run(burst(router, calls, generate, held=slots + queue, probes=probes))
    rejected = [a.ms for a in answers if a.status == "RESOURCE_EXHAUSTED"]
    admitted = [a for a in [*answers, *probed] if a.status != "RESOURCE_EXHAUSTED"]
    result.requests = len(answers) + len(probed)
    result.statuses.update(a.status for a in [*answers, *probed])
    result.failed = sum(a.status != "OK" or len(a.reply.token_ids) != new_tokens for a in admitted)
    result.check("every admitted request completes", result.failed == 0)
    p99 = percentile(rejected, 99)
    result.check(f"rejection p99 < {REJECTION_P99_BAR_MS:.0f} ms", bool(rejected) and p99 < REJECTION_P99_BAR_MS)
    info, _ = asyncio.run(burst(router, calls, server_info))
    result.note(f"{len(admitted)} admitted; " + "; ".join([
        latency_note("rejections in the burst", answers, "RESOURCE_EXHAUSTED"),
        latency_note(f"{probes} more one at a time", probed, "RESOURCE_EXHAUSTED"),
        latency_note(f"a burst of {calls} GetServerInfo", info, "OK")]))
    result.raw.update(rejection_ms=rejected, probe_ms=[a.ms for a in probed], server_info_ms=[a.ms for a in info])
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
    started = time.monotonic()
    with (signals_as_interrupt(), tempfile.TemporaryDirectory() as tmp,
          client_pool(64) as pool, Deployment(args.log_dir or Path(tmp)) as deployment):
        fleet = ChaosFleet(deployment, "WARNING" if args.log_dir is None else "INFO", args.depth,
                           args.target_threads)
        ctx = Context(fleet, pool, args.streams, args.new_tokens, args.fuzz, args.seed)
        results = run_scenarios(names, ctx)
    print(f"\n{table(results)}\n\n{len(names)} scenario(s) in {time.monotonic() - started:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps([r.to_json() for r in results], indent=1))


if __name__ == "__main__":
    main()
