"""The adaptive depth policy through the real services: telemetry reaches Redis, routers share it,
and losing Redis mid-run changes nothing in the output."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from specfleet.client import make_request, stream
from specfleet.launcher import Deployment, free_port, wait_redis
from specfleet.protos import generate_pb2, generate_pb2_grpc

pytestmark = pytest.mark.real_model

PROMPTS = [
    "Rename the variable x to count in this code:\ndef f(x):\n    x = x + 1\n    return x * x\n",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "List three colors of the rainbow.",
    "Explain in one sentence why the sky is blue.",
]


def _info(address: str) -> generate_pb2.GetServerInfoResponse:
    with grpc.insecure_channel(address) as channel:
        return generate_pb2_grpc.GenerationServiceStub(channel).GetServerInfo(generate_pb2.GetServerInfoRequest(),
                                                                             timeout=10)


def _generate(address: str, prompt: str, max_new: int = 32) -> tuple[list[int], generate_pb2.GenerateResponse]:
    messages = list(stream(address, make_request(prompt, max_new_tokens=max_new), timeout_s=300))
    return [t for m in messages for t in m.token_ids], messages[-1]


def _wait(condition, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.fixture(scope="module")
def plain(cluster) -> list[list[int]]:
    address = cluster.router("router-plain", target="target", draft=None, depth=0)
    return [_generate(address, p)[0] for p in PROMPTS]


def test_auto_depth_explains_itself(cluster, plain) -> None:
    address = cluster.router("router-auto-a", target="target", draft="ngram", depth="auto")
    tokens, last = _generate(address, PROMPTS[0])
    assert tokens == plain[0]
    assert "tok/s" in last.stats.depth_reason  # the predicted goodput of the candidates
    info = _info(address)
    assert info.depth_setting == "auto" and info.policy.mode == "throughput"
    assert info.policy.last_decision.startswith("batch ")


def test_routers_share_measurements_through_redis(cluster, plain) -> None:
    busy = cluster.router("router-auto-a", target="target", draft="ngram", depth="auto")
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(lambda p: _generate(busy, p)[0], PROMPTS)) == plain
    # A second router that has served nothing sees the first one's steps and the services' costs.
    idle = cluster.router("router-auto-b", target="target", draft="ngram", depth="auto")
    assert _wait(lambda: _info(idle).policy.refreshes > 0)
    policy = _info(idle).policy
    assert policy.redis_up
    assert policy.fleet_sequence_steps > 0  # acceptance counted by the busy router
    assert 0 < policy.fleet_offer_rate <= 1  # and the share of its asks the ngram drafter answered
    assert policy.cost_samples["overhead"] > 0  # the busy router's step overheads
    assert policy.cost_samples["target"] > 0 and policy.cost_samples["draft"] > 0


def test_redis_killed_mid_run_changes_nothing(cluster, plain, tmp_path: Path) -> None:
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    with Deployment(tmp_path) as own_redis:
        wait_redis(own_redis.start_redis(port), port)
        address = cluster.router("router-auto-redis", target="target", draft="ngram", depth="auto",
                                 redis_url=redis_url, extra=["--policy-refresh-s", "0.2"])
        assert _wait(lambda: _info(address).policy.redis_up)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            running = [pool.submit(_generate, address, p, 96) for p in PROMPTS]
            time.sleep(1.0)
            own_redis.stop()  # mid-run
            outputs = [f.result()[0] for f in running]
        assert not _info(address).policy.redis_up
        refreshes = _info(address).policy.refreshes
        # Greedy output is unchanged (the first 32 tokens are the plain run's; the policy only moves speed).
        assert [o[:32] for o in outputs] == plain
        assert _generate(address, PROMPTS[0])[0] == plain[0]  # still serving without Redis

        wait_redis(own_redis.start_redis(port), port)  # Redis returns
        assert _wait(lambda: _info(address).policy.redis_up and _info(address).policy.refreshes > refreshes)
        assert _generate(address, PROMPTS[1])[0] == plain[1]
