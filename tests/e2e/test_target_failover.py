"""A target that dies or stops costs a re-prefill at most, never a request. With two fixed target replicas, `kill -9`
of one while streams run moves its sequences to the other (outputs identical to an uninterrupted run, greedy and
seeded sampling), new requests go to the live one only, and the killed replica rejoins once it is started again.
SIGTERM makes a target finish the sequences it holds while new requests go elsewhere, alone or not."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from streaming import Streaming

from specfleet.client import make_request
from specfleet.launcher import Deployment, Process, free_port, wait_serving
from specfleet.protos import generate_pb2, generate_pb2_grpc

PROMPTS = ["def add(a, b):", "The capital of France is", "1, 2, 3, 4,", "Once upon a time",
           "import numpy as np", "Dear team,", "SELECT * FROM", "The quick brown fox"]
NEW_TOKENS = 160  # long enough to be mid-stream when the kill comes


def requests(tag: str) -> list[generate_pb2.GenerateRequest]:
    """Six greedy requests, each with one right answer, and two sampled ones with a seed.

    A seeded request draws the same uniforms wherever it runs, but the target's float kernels are not batch-invariant:
    in another batch a logit may move in its last bits, and a random model's nearly flat distribution over 49152 tokens
    turns that into another sample now and then. So the sampled ones are checked for finishing whole, and only the
    greedy ones token for token (`same_answers`)."""
    made = [make_request(p, max_new_tokens=NEW_TOKENS, ignore_eos=True) for p in PROMPTS[:6]]
    made += [make_request(p, max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.9, top_p=0.95, seed=11 + i)
             for i, p in enumerate(PROMPTS[6:])]
    for i, request in enumerate(made):
        request.request_id = f"{tag}-{i}"
    return made


def same_answers(got: list[list[int]], expected: list[list[int]]) -> bool:
    greedy = len(PROMPTS) - 2
    return got[:greedy] == expected[:greedy] and all(len(tokens) == NEW_TOKENS for tokens in got[greedy:])


def server_info(router: str) -> generate_pb2.GetServerInfoResponse:
    with grpc.insecure_channel(router) as channel:
        return generate_pb2_grpc.GenerationServiceStub(channel).GetServerInfo(generate_pb2.GetServerInfoRequest(),
                                                                              timeout=10)


def eventually(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.1)


@dataclass
class TwoTargets:
    deployment: Deployment
    model: Path
    ports: dict[str, int]
    processes: dict[str, Process]
    router: str  # over both targets, drafting
    reference: str  # plain decoding on target b alone

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start_target(self, name: str) -> None:
        args = ["--model", str(self.model), "--device", "cpu", "--num-slots", "16", "--max-seq-len", "1024",
                "--port", str(self.ports[name])]
        self.processes[name] = self.deployment.start_service("target", args, name=f"target-{name}")
        wait_serving(self.processes[name], self.address(name), timeout_s=300)


@pytest.fixture(scope="module")
def two_targets(tiny_draft_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoTargets]:
    with Deployment(tmp_path_factory.mktemp("failover-logs")) as deployment:
        names = ("a", "b", "lone", "draft", "router", "reference", "lone-router")
        fleet = TwoTargets(deployment, tiny_draft_dir, {name: free_port() for name in names}, {}, "", "")
        for name in ("a", "b", "lone"):
            fleet.start_target(name)
        draft = deployment.start_service("draft", ["--drafter", "ngram", "--port", str(fleet.ports["draft"])])
        wait_serving(draft, fleet.address("draft"))
        for name, args in (("router", ["--targets", f"{fleet.address('a')},{fleet.address('b')}", "--drafts",
                                       fleet.address("draft"), "--depth", "3"]),
                           ("reference", ["--targets", fleet.address("b"), "--depth", "0"]),
                           ("lone-router", ["--targets", fleet.address("lone"), "--drafts", fleet.address("draft"),
                                            "--depth", "3"])):
            process = deployment.start(name, [sys.executable, "-m", "specfleet.cli", "router", "--port",
                                              str(fleet.ports[name]), *args])
            wait_serving(process, fleet.address(name))
        fleet.router, fleet.reference = fleet.address("router"), fleet.address("reference")
        yield fleet


def answers(pool: ThreadPoolExecutor, router: str, tag: str) -> list[list[int]]:
    return [s.future.result() for s in [Streaming(pool, router, r) for r in requests(tag)]]


def interrupted(pool: ThreadPoolExecutor, router: str, tag: str, interrupt: Callable[[], object]) -> list[Streaming]:
    """The streams of ``requests(tag)``, interrupted once each has had its first message."""
    running = [Streaming(pool, router, r) for r in requests(tag)]
    assert all(s.started.wait(120) for s in running)
    interrupt()
    assert not all(s.future.done() for s in running), "the streams ended before the interruption: nothing was tested"
    return running


def kill_9(process: Process) -> None:
    process.popen.kill()
    process.popen.wait()


def test_kill_9_of_a_target_mid_stream_loses_nothing_and_it_rejoins(two_targets: TwoTargets) -> None:
    fleet = two_targets
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        expected = answers(pool, fleet.reference, "ref")
        running = interrupted(pool, fleet.router, "first", lambda: kill_9(fleet.processes["a"]))
        assert same_answers([s.future.result() for s in running], expected)  # none failed, none changed

        eventually(lambda: list(server_info(fleet.router).target_addresses) == [fleet.address("b")],
                   "the router drops the dead target")
        assert same_answers(answers(pool, fleet.router, "after"), expected)

        fleet.start_target("a")  # the same address, started again
        eventually(lambda: len(server_info(fleet.router).target_addresses) == 2, "the target rejoins")
        assert same_answers(answers(pool, fleet.router, "again"), expected)

    log = router_log(fleet)
    assert f"target {fleet.address('a')} stopped answering" in log and "moved to the other 1 target(s)" in log
    assert f"target {fleet.address('a')} joined" in log


def test_sigterm_of_a_target_beside_another_cuts_nothing_and_its_successor_joins(two_targets: TwoTargets) -> None:
    fleet = two_targets
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        expected = answers(pool, fleet.reference, "ref2")
        running = interrupted(pool, fleet.router, "drained",
                              lambda: fleet.processes["a"].popen.send_signal(signal.SIGTERM))
        later = [Streaming(pool, fleet.router, r) for r in requests("during")]  # while a drains: they go to b
        assert same_answers([s.future.result() for s in running], expected)
        assert same_answers([s.future.result() for s in later], expected)
        assert fleet.processes["a"].popen.wait(60) == 0  # it stopped once its sequences were done

        fleet.start_target("a")
        eventually(lambda: len(server_info(fleet.router).target_addresses) == 2, "the restarted target joins")
        assert same_answers(answers(pool, fleet.router, "back"), expected)
    log = router_log(fleet)
    assert f"target {fleet.address('a')} is shutting down" in log


def test_sigterm_of_a_lone_target_lets_every_stream_finish(two_targets: TwoTargets) -> None:
    fleet = two_targets
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        expected = answers(pool, fleet.reference, "ref3")
        running = interrupted(pool, fleet.address("lone-router"), "alone",
                              lambda: fleet.processes["lone"].popen.send_signal(signal.SIGTERM))
        assert same_answers([s.future.result() for s in running], expected)
        assert fleet.processes["lone"].popen.wait(60) == 0


def router_log(fleet: TwoTargets, name: str = "router") -> str:
    return next(p for p in fleet.deployment.processes if p.name == name).log_tail(400)
