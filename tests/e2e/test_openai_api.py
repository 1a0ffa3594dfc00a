"""The OpenAI-compatible HTTP API, with the official `openai` client against real services: the same tokens as
the gRPC API and as plain decoding, streaming and not; usage counts; stop strings; clear errors with OpenAI's
statuses; and a client that hangs up mid-stream frees its sequence on draft and target."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from live_sequences import wait_live

from specfleet.client import make_request, stream
from specfleet.launcher import free_port
from specfleet.protos import draft_pb2_grpc, target_pb2_grpc

pytestmark = pytest.mark.real_model

PROMPTS = ["Write a Python function that reverses a string.", "What is the capital of France?",
           "List three colors of the rainbow."]
MAX_NEW = 24


@pytest.fixture(scope="module")
def api(cluster) -> dict[str, str]:
    """Routers with the HTTP API on: one speculating with the ngram drafter, one decoding plainly, one that refuses
    every request (a full queue)."""
    ports = {name: free_port() for name in ("spec", "plain", "full")}
    grpc_spec = cluster.router("http-spec", target="target", draft="ngram", depth="auto",
                               extra=["--http-port", str(ports["spec"])])
    grpc_plain = cluster.router("http-plain", target="target", draft=None, depth=0,
                                extra=["--http-port", str(ports["plain"])])
    cluster.router("http-full", target="target", draft=None, depth=0,
                   extra=["--http-port", str(ports["full"]), "--max-queue", "0"])
    return {"spec": f"http://127.0.0.1:{ports['spec']}/v1", "plain": f"http://127.0.0.1:{ports['plain']}/v1",
            "full": f"http://127.0.0.1:{ports['full']}/v1", "grpc_spec": grpc_spec, "grpc_plain": grpc_plain}


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


def _model(base_url: str) -> str:
    return _client(base_url).models.list().data[0].id


def _grpc(address: str, **kwargs) -> tuple[list[int], str]:
    tokens, text = [], []
    for message in stream(address, make_request(**kwargs), timeout_s=300):
        tokens.extend(message.token_ids)
        text.append(message.text)
    return tokens, "".join(text)


def test_models_and_health(api) -> None:
    models = _client(api["spec"]).models.list().data
    assert len(models) == 1 and models[0].owned_by == "specfleet"
    assert httpx.get(api["spec"].removesuffix("/v1") + "/health").status_code == 200


def test_chat_completions_equal_the_grpc_api_and_plain_decoding(api) -> None:
    client, model = _client(api["spec"]), _model(api["spec"])
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_NEW, temperature=0)
        tokens, text = _grpc(api["grpc_plain"], chat=messages, max_new_tokens=MAX_NEW)
        choice = answer.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == text
        assert answer.usage.completion_tokens == len(tokens)
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + len(tokens)
        assert choice.finish_reason in ("stop", "length")
        spec = answer.model_extra["metrics"]["speculative_decoding"]
        assert spec["num_spec_steps"] >= 1 and spec["num_draft_tokens"] >= spec["num_accepted_draft_tokens"]


def test_streamed_chat_is_the_same_answer_with_usage_last(api) -> None:
    client, model = _client(api["spec"]), _model(api["spec"])
    messages = [{"role": "user", "content": PROMPTS[0]}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_NEW, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_NEW, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_equal_plain_decoding_streamed_or_not(api) -> None:
    client, model = _client(api["spec"]), _model(api["spec"])
    plain = _client(api["plain"])
    for prompt in ["def fibonacci(n):", "The three primary colors are"]:
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0)
        reference = plain.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0, stream=True))
        tokens, text = _grpc(api["grpc_spec"], prompt=prompt, max_new_tokens=MAX_NEW)
        assert answer.choices[0].text == reference.choices[0].text == streamed == text
        assert answer.usage.completion_tokens == reference.usage.completion_tokens == len(tokens)


def test_token_id_prompts_and_the_default_max_tokens(api) -> None:
    client, model = _client(api["spec"]), _model(api["spec"])
    ids, _ = _grpc(api["grpc_plain"], prompt="Count: 1, 2, 3,", max_new_tokens=4)
    answer = client.completions.create(model=model, prompt=[1, 2, 3, *ids], temperature=0)
    assert answer.usage.prompt_tokens == 3 + len(ids) and answer.usage.completion_tokens <= 16  # OpenAI's default


def test_a_stop_string_ends_the_answer_before_it(api) -> None:
    client, model = _client(api["spec"]), _model(api["spec"])
    whole = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=MAX_NEW, temperature=0)
    text = whole.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    cut = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=MAX_NEW, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.index(stop)]


def test_errors_are_openai_error_objects_with_the_right_status(api) -> None:
    client, model = _client(api["spec"]), _model(api["spec"])
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=messages)
    assert unknown.value.code == "model_not_found" and model in unknown.value.message
    for bad, param in [({"temperature": -1}, None), ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
                       ({"max_tokens": 0}, None), ({"tools": [{"type": "function", "function": {"name": "f"}}]},
                                                   "tools")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=model, messages=messages, **bad)
        assert refused.value.status_code == 400, bad
        if param is not None:
            assert refused.value.param == param and param in refused.value.message
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=model, messages=[])
    with pytest.raises(openai.RateLimitError, match="max-queue"):
        _client(api["full"]).chat.completions.create(model=model, messages=messages)
    raw = httpx.post(api["spec"] + "/chat/completions", content=b"{not json", timeout=30)
    assert raw.status_code == 400 and "error" in raw.json()


def test_a_client_that_hangs_up_mid_stream_frees_its_sequence(api, cluster) -> None:
    model = _model(api["spec"])
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story about a robot."}],
            "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", api["spec"] + "/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            if line.startswith("data: {"):
                json.loads(line.removeprefix("data: "))
                events += 1
            if events == 4:
                break  # leaving the block closes the connection mid-stream
    started = time.monotonic()
    assert wait_live(cluster.addresses["target"], target_pb2_grpc.TargetServiceStub, 0) == 0
    assert wait_live(cluster.addresses["ngram"], draft_pb2_grpc.DraftServiceStub, 0) == 0
    assert time.monotonic() - started < 20
