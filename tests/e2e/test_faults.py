"""Bad input gets a clear gRPC status and disturbs nothing; cancelled work frees its cache slots;
a draft service that is down, stalled or restarted never fails a request."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from live_sequences import wait_live

from specfleet.client import make_request, stream
from specfleet.protos import draft_pb2_grpc, generate_pb2, generate_pb2_grpc, target_pb2_grpc

pytestmark = pytest.mark.real_model

PROMPT = "Write a Python function that reverses a string."


def _tokens(address: str, request, timeout_s: float = 300) -> list[int]:
    return [t for m in stream(address, request, timeout_s=timeout_s) for t in m.token_ids]


@pytest.fixture(scope="module")
def router(cluster) -> str:
    return cluster.router("router-faults", target="target", draft="ngram", depth=4,
                          extra=["--max-new-tokens-cap", "512"])


BAD_REQUESTS = [
    (make_request(""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    (generate_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    (make_request([1] * 1100), grpc.StatusCode.INVALID_ARGUMENT, "context holds"),
    (make_request([10 ** 6]), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    (make_request(PROMPT, max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (make_request(PROMPT, max_new_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (make_request(PROMPT, max_new_tokens=513), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (make_request(PROMPT, temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (make_request(PROMPT, temperature=1.0, top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (make_request(PROMPT, temperature=1.0, top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (make_request(PROMPT, top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (make_request(chat=[{"role": "wizard", "content": "hi"}]), grpc.StatusCode.INVALID_ARGUMENT, "role"),
]


def test_bad_input_gets_clear_status_while_a_good_request_carries_on(router: str) -> None:
    expected = _tokens(router, make_request(PROMPT, max_new_tokens=24))
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(_tokens, router, make_request(PROMPT, max_new_tokens=24))
        for request, code, words in BAD_REQUESTS:
            with pytest.raises(grpc.RpcError) as caught:
                _tokens(router, request)
            assert caught.value.code() == code, (request, caught.value.details())
            assert words in caught.value.details()
        assert good.result() == expected


def test_duplicate_live_request_id_and_abort(cluster, router: str) -> None:
    request = make_request(PROMPT, request_id="dup", max_new_tokens=400, ignore_eos=True)
    messages: list[generate_pb2.GenerateResponse] = []
    first = threading.Thread(target=lambda: messages.extend(stream(router, request, timeout_s=300)))
    first.start()
    while not messages:
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as caught:
        _tokens(router, make_request(PROMPT, request_id="dup", max_new_tokens=4))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS and "dup" in caught.value.details()

    with grpc.insecure_channel(router) as channel:
        aborted = generate_pb2_grpc.GenerationServiceStub(channel).Abort(generate_pb2.AbortRequest(request_id="dup"))
    assert aborted.aborted
    first.join(30)
    assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_ABORTED
    assert len([t for m in messages for t in m.token_ids]) < 400
    assert wait_live(cluster.addresses["target"], target_pb2_grpc.TargetServiceStub, 0) == 0
    assert wait_live(cluster.addresses["ngram"], draft_pb2_grpc.DraftServiceStub, 0) == 0


def test_deadline_and_cancel_release_cache_slots(cluster, router: str) -> None:
    long_request = make_request(PROMPT, max_new_tokens=500, ignore_eos=True)
    with pytest.raises(grpc.RpcError) as caught:
        _tokens(router, long_request, timeout_s=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_live(cluster.addresses["target"], target_pb2_grpc.TargetServiceStub, 0) == 0
    assert wait_live(cluster.addresses["ngram"], draft_pb2_grpc.DraftServiceStub, 0) == 0

    with grpc.insecure_channel(router) as channel:
        call = generate_pb2_grpc.GenerationServiceStub(channel).GenerateStream(long_request, timeout=300)
        next(call)
        next(call)
        call.cancel()
    assert wait_live(cluster.addresses["target"], target_pb2_grpc.TargetServiceStub, 0) == 0
    assert wait_live(cluster.addresses["ngram"], draft_pb2_grpc.DraftServiceStub, 0) == 0


def test_seeded_sampling_is_reproducible(router: str) -> None:
    # ignore_eos keeps all 24 tokens, so two seeds agreeing by chance is out of the question.
    def sampled(seed: int) -> generate_pb2.GenerateRequest:
        return make_request(PROMPT, max_new_tokens=24, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)

    first = _tokens(router, sampled(1234))
    assert len(first) == 24
    assert _tokens(router, sampled(1234)) == first
    assert _tokens(router, sampled(99)) != first


def test_stop_strings_and_stats(router: str) -> None:
    messages = list(stream(router, make_request("Count: 1, 2, 3, 4, 5, 6, 7, 8", max_new_tokens=40, stop=[", 1"])))
    last = messages[-1]
    text = "".join(m.text for m in messages)
    assert ", 1" not in text
    assert last.finish_reason in (generate_pb2.FINISH_REASON_STOP, generate_pb2.FINISH_REASON_LENGTH,
                                  generate_pb2.FINISH_REASON_EOS)
    assert last.stats.steps >= 1 and last.stats.drafted_tokens >= last.stats.accepted_tokens


def test_draft_down_stalled_or_restarted_never_fails_a_request(cluster, smollm2_dir) -> None:
    draft_address = cluster.start("ngram-fragile", "draft", ["--drafter", "ngram"])
    router = cluster.router("router-fragile", target="target", draft="ngram-fragile", depth=4,
                            extra=["--draft-timeout-ms", "300", "--draft-retry-s", "0.5"])
    request = make_request(PROMPT, max_new_tokens=48)
    expected = _tokens(router, request)

    draft = cluster.process("ngram-fragile")
    os.kill(draft.popen.pid, signal.SIGSTOP)  # stalled: Propose times out, steps run at depth 0
    try:
        assert _tokens(router, request) == expected
    finally:
        os.kill(draft.popen.pid, signal.SIGCONT)

    # Restarted on the same port: it has forgotten every sequence, the router resends them.
    long_request = make_request(PROMPT, max_new_tokens=200, ignore_eos=True)
    plain = cluster.router("router-plain", target="target", draft=None, depth=0)
    expected_long = _tokens(plain, long_request)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_tokens, router, long_request)
        time.sleep(1.0)
        draft.popen.kill()
        draft.popen.wait()
        # Down: connection refused, depth 0.
        assert _tokens(router, request) == expected
        port = draft_address.rsplit(":", 1)[1]
        cluster.deployment.processes.remove(draft)
        del cluster.addresses["ngram-fragile"]
        restarted = cluster.deployment.start_service("draft", ["--drafter", "ngram", "--port", port],
                                                     name="ngram-fragile")
        from specfleet.launcher import wait_serving

        wait_serving(restarted, draft_address)
        assert running.result() == expected_long
    assert _tokens(router, request) == expected
    log = (cluster.deployment.log_dir / "router-fragile.log").read_text()
    assert "depth 0" in log
