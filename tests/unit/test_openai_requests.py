"""The OpenAI API's requests and errors, without a server: what is refused and how it is said, and how a request
becomes the router's `GenerationRequest` (the end-to-end tests with the `openai` client are in tests/e2e)."""

from __future__ import annotations

import grpc
import pytest

from router.admission import GenerationRequest, RequestError
from router.live_request import StreamError
from router.openai_api import ApiError, ChatCompletionRequest, ChatMessage, CompletionRequest


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": 3}, "n"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
])
def test_what_chat_does_not_do_is_refused_by_name(fields: dict, param: str) -> None:
    assert [p for p, _ in _chat(**fields).refusals()] == [param]


def test_supported_and_unknown_chat_parameters_pass() -> None:
    request = _chat(n=1, response_format={"type": "text"}, presence_penalty=0, user="u", parallel_tool_calls=False)
    assert list(request.refusals()) == []


def test_a_chat_request_becomes_the_routers_request() -> None:
    request = _chat(max_tokens=7, top_p=0.9, top_k=5, seed=3, stop="##", ignore_eos=True)
    generation = request.generation(7, "r1", chat=(("user", "hi"),))
    assert generation == GenerationRequest(chat=(("user", "hi"),), request_id="r1", max_new_tokens=7, temperature=1.0,
                                           top_k=5, top_p=0.9, seed=3, stop=("##",), ignore_eos=True)
    assert _chat(temperature=0).generation(None, "r2", chat=()).temperature == 0.0  # greedy when asked


def test_message_content_parts_are_joined_and_non_text_parts_refused() -> None:
    parts = ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert parts.text() == "ab"
    with pytest.raises(ApiError, match="image_url"):
        ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}}]).text()


@pytest.mark.parametrize(("prompt", "expected"), [
    ("def f():", {"text": "def f():"}), ([1, 2, 3], {"token_ids": (1, 2, 3)}), (["one"], {"text": "one"}),
    ([[4, 5]], {"token_ids": (4, 5)}),
])
def test_a_completion_takes_one_prompt_as_text_or_token_ids(prompt, expected: dict) -> None:
    assert CompletionRequest(model="m", prompt=prompt).prompt_fields() == expected


def test_a_batch_of_prompts_and_completion_only_parameters_are_refused() -> None:
    with pytest.raises(ApiError, match="one prompt per request"):
        CompletionRequest(model="m", prompt=["a", "b"]).prompt_fields()
    refused = CompletionRequest(model="m", prompt="a", echo=True, suffix="x", best_of=2, logprobs=1)
    assert [p for p, _ in refused.refusals()] == ["logprobs", "echo", "suffix", "best_of"]


@pytest.mark.parametrize(("code", "status", "type_"), [
    (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    (grpc.StatusCode.INTERNAL, 500, "internal_error"),
])
def test_the_routers_errors_keep_their_message_under_openais_status(code, status: int, type_: str) -> None:
    for err in (RequestError(code, "what went wrong"), StreamError(code, "what went wrong")):
        api = ApiError.of(err)
        assert (api.status, api.type) == (status, type_)
        assert api.body() == {"error": {"message": "what went wrong", "type": type_, "param": None,
                                        "code": code.name.lower()}}
