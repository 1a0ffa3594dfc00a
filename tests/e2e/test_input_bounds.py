"""No request can stall the others. While four requests stream, the router is sent a multi-MiB prompt (tokenised in a
worker thread, then refused: no model here holds it), prompts and stop strings over its limits (refused before any
tokenisation, naming the flag), stop strings at the limits (served) and bytes that are no protobuf message (refused
with INVALID_ARGUMENT by router, draft and target): the four streams never pause for long."""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from specfleet.client import make_request, stream
from specfleet.launcher import Deployment, free_port, wait_serving
from specfleet.protos import generate_pb2

MiB = 1 << 20
PROMPT_CAP = 4 * MiB
STOP_STRINGS, STOP_LENGTH = 16, 256  # the router's defaults
STALL_BOUND_S = 1.0
"""The longest pause allowed between two messages of a stream while the others' requests come in: steps here take
tens of milliseconds, and tokenising a 3 MiB prompt on the event loop paused every stream for seconds."""
PROMPT = "Write a Python function that reverses a string."
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "wizards", "judge", "boxing",
         "return", "results", "from", "def", "class", "import", "numpy", "as", "np", "print")


@dataclass(frozen=True)
class Fleet:
    router: str
    http: str
    draft: str
    target: str


@pytest.fixture(scope="module")
def fleet(tiny_draft_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A tiny target with SmolLM2's tokenizer (fast steps, the real tokenizer's cost), an ngram draft, a router."""
    ports = {role: free_port() for role in ("router", "http", "draft", "target")}
    addresses = {role: f"127.0.0.1:{ports[role]}" for role in ports}
    with Deployment(tmp_path_factory.mktemp("bounds-logs")) as deployment:
        def start(role: str, args: list[str]) -> None:
            argv = [sys.executable, "-m", "specfleet.cli", role, "--port", str(ports[role]), *args]
            wait_serving(deployment.start(role, argv, {"OMP_NUM_THREADS": "1"}), addresses[role], timeout_s=300)

        start("target", ["--model", str(tiny_draft_dir), "--device", "cpu", "--num-slots", "8", "--max-seq-len",
                         "2048"])
        start("draft", ["--drafter", "ngram"])
        start("router", ["--targets", addresses["target"], "--drafts", addresses["draft"], "--depth", "2",
                         "--http-port", str(ports["http"]), "--served-model-name", "tiny",
                         "--max-prompt-bytes", str(PROMPT_CAP)])
        yield Fleet(addresses["router"], f"http://127.0.0.1:{ports['http']}/v1", addresses["draft"],
                    addresses["target"])


@dataclass
class Streams:
    """Ordinary streaming requests in threads, each message's arrival time noted, until told to stop."""

    router: str
    count: int = 4
    arrivals: list[list[float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Streams:
        self.arrivals = [[] for _ in range(self.count)]
        for times in self.arrivals:
            thread = threading.Thread(target=self._read, args=(times,), daemon=True)
            thread.start()
            self.threads.append(thread)
        deadline = time.monotonic() + 120
        while min(len(times) for times in self.arrivals) < 5:  # all of them past their prefill, streaming
            assert time.monotonic() < deadline, "the ordinary streams did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _read(self, times: list[float]) -> None:
        request = make_request(PROMPT, max_new_tokens=1900, ignore_eos=True, temperature=0.0)
        for _ in stream(self.router, request, timeout_s=600):
            times.append(time.perf_counter())
            if self.stop.is_set():
                return  # leaving the generator cancels the call

    def gaps(self, start: float, end: float) -> list[float]:
        """The pauses between successive messages of each stream that ended between ``start`` and ``end``."""
        for times in self.arrivals:
            assert times[-1] > end, "a stream ended before the disturbance did: nothing was measured"
        return [later - earlier for times in self.arrivals for earlier, later in zip(times, times[1:], strict=False)
                if start < later <= end]


def long_text(size: int, seed: int = 0) -> str:
    """English-like text of ``size`` bytes: words and spaces, as a pasted document would be."""
    rng = random.Random(seed)
    text = " ".join(rng.choices(WORDS, k=size // 4))
    return (text * (size // len(text) + 1))[:size]


def _refusal(router: str, request: generate_pb2.GenerateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(stream(router, request, timeout_s=300))
    return caught.value


def _garbage_status(address: str, method: str, streaming: bool) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(address) as channel:
        kind = channel.unary_stream if streaming else channel.unary_unary
        call = kind(method, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        try:
            response = call(b"\xff\xff\xff\xff garbage", timeout=30)
            if streaming:
                list(response)
        except grpc.RpcError as err:
            return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def test_nothing_sent_to_the_router_pauses_the_streams_of_others(fleet: Fleet) -> None:
    # Made before the streams start: this process's own work would delay its reading of them.
    within_limit, over_limit = make_request(long_text(3 * MiB)), make_request(long_text(PROMPT_CAP + 1))
    chat_over_limit = {"model": "tiny", "messages": [
        {"role": "system", "content": long_text(PROMPT_CAP // 2)},
        {"role": "user", "content": long_text(PROMPT_CAP // 2 + 1, seed=1)}]}
    with Streams(fleet.router) as streams:
        started = time.perf_counter()

        # Within the size limit, a prompt of 3 MiB is tokenised (seconds of work, in a worker thread), then refused:
        # it is some 600K tokens, and the target's context holds 2048.
        refused = _refusal(fleet.router, within_limit)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "context holds 2048" in refused.details()
        tokenised = time.perf_counter()

        # Over the limits: refused at once, naming the flag.
        refused = _refusal(fleet.router, over_limit)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"at most {PROMPT_CAP} are accepted (--max-prompt-bytes)" in refused.details()
        answer = httpx.post(f"{fleet.http}/chat/completions", json=chat_over_limit, timeout=60)
        assert answer.status_code == 400 and "--max-prompt-bytes" in answer.json()["error"]["message"]
        many_stops = [f"never {i} " * 37 for i in range(1000)]  # 1000 stop strings of about 300 characters
        refused = _refusal(fleet.router, make_request(PROMPT, stop=many_stops))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-stop-strings" in refused.details()
        refused = _refusal(fleet.router, make_request(PROMPT, stop=["x" * (STOP_LENGTH + 1)]))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-stop-length" in refused.details()

        # At the limits: served.
        at_limits = [(f"never {i} " * 40)[:STOP_LENGTH] for i in range(STOP_STRINGS)]
        messages = list(stream(fleet.router, make_request(PROMPT, max_new_tokens=64, ignore_eos=True,
                                                          stop=at_limits), timeout_s=300))
        assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert sum(len(m.token_ids) for m in messages) == 64

        # Bytes that are no message: INVALID_ARGUMENT from each service, naming the message it expected.
        for address, method, streaming, message in (
                (fleet.router, "/specfleet.v1.GenerationService/Generate", False, "GenerateRequest"),
                (fleet.router, "/specfleet.v1.GenerationService/GenerateStream", True, "GenerateRequest"),
                (fleet.target, "/specfleet.v1.TargetService/Verify", False, "VerifyRequest"),
                (fleet.draft, "/specfleet.v1.DraftService/Propose", False, "ProposeRequest")):
            code, details = _garbage_status(address, method, streaming)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
            assert f"the request is not a valid specfleet.v1.{message}" in details
        ended = time.perf_counter()
        time.sleep(0.5)  # a pause that began before the end shows once the next message arrives

    gaps = streams.gaps(started, ended + 0.5)
    print(f"\n3 MiB prompt refused after {tokenised - started:.1f} s; stream gaps over {ended - started:.1f} s: "
          f"median {statistics.median(gaps) * 1000:.0f} ms, largest {max(gaps) * 1000:.0f} ms")
    assert max(gaps) < STALL_BOUND_S


def test_a_target_without_space_refuses_next_step_drafts_naming_why(fleet: Fleet) -> None:
    """Only a SPACE target drafts for itself: another says so in GetInfo, and a Verify that asks it for next-step
    drafts is refused whole, with the reason, before it touches any sequence."""
    from specfleet.protos import session_pb2, target_pb2, target_pb2_grpc

    with grpc.insecure_channel(fleet.target) as channel:
        stub = target_pb2_grpc.TargetServiceStub(channel)
        info = stub.GetInfo(session_pb2.GetServiceInfoRequest(), timeout=30)
        deadline = time.monotonic() + 60
        while info.live_sequences:  # streams an earlier test cancelled are released by the router in its own time
            assert time.monotonic() < deadline, f"{info.live_sequences} sequences still live on an idle fleet"
            time.sleep(0.1)
            info = stub.GetInfo(session_pb2.GetServiceInfoRequest(), timeout=30)
        assert (info.max_draft_next, info.self_drafting) == (0, "")
        entry = target_pb2.VerifyEntry(sequence=session_pb2.SequenceDelta(seq_id="asks-space", new_tokens=[1, 2, 3]),
                                       draft_next=2)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Verify(target_pb2.VerifyRequest(entries=[entry]), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not started with a SPACE model" in refused.value.details()
        assert stub.GetInfo(session_pb2.GetServiceInfoRequest(), timeout=30).live_sequences == 0
