"""Admission without a server: the cheap limits refuse a request before its prompt is tokenised, with a message that
names the flag; the queue holds the requests still tokenising; tokenisation runs off the event loop."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import grpc
import pytest

from router.admission import GenerationRequest, RequestError, Router, utf8_size
from router.live_request import DRAFT_POOL
from specfleet.config import RouterConfig


class CharTokenizer:
    """One token per character; records the threads it ran in, and can be held mid-encode."""

    chat_template = "{{ messages }}"

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.release = threading.Event()
        self.release.set()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread())
        self.release.wait(10)
        return [ord(c) % 97 for c in text]

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool, tokenize: bool) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeFleet:
    """What admission asks of the fleet: the reference target, room, and where requests go."""

    def __init__(self, max_context: int = 1 << 20) -> None:
        self.reference = SimpleNamespace(info=SimpleNamespace(model="toy", vocab_size=97))
        self.max_context = max_context
        self.placed: list = []
        self.live = 0

    @property
    def queued(self) -> int:
        return len(self.placed)

    first_pool = DRAFT_POOL

    def pin_drafts(self) -> dict:
        return {}

    def has_room(self) -> bool:  # the canary asks; it replays nothing here
        return False

    def place(self, seq) -> None:
        self.placed.append(seq)


def _router(**config) -> tuple[Router, CharTokenizer]:
    tokenizer = CharTokenizer()
    router = Router(RouterConfig(**config), FakeFleet(), tokenizer, frozenset(), feed=None, router_id="r")
    return router, tokenizer


def _refusal(router: Router, request: GenerationRequest) -> RequestError:
    with pytest.raises(RequestError) as caught:
        asyncio.run(router.admit(request))
    return caught.value


@pytest.mark.parametrize(("request_", "flag", "words"), [
    (GenerationRequest(text="x" * 101), "--max-prompt-bytes", "prompt is 101 bytes; at most 100"),
    (GenerationRequest(text="é" * 51), "--max-prompt-bytes", "prompt is 102 bytes"),  # bytes, not characters
    (GenerationRequest(chat=(("system", "x" * 60), ("user", "y" * 41))), "--max-prompt-bytes", "prompt is 101 bytes"),
    (GenerationRequest(text="hi", stop=("a",) * 5), "--max-stop-strings", "5 stop strings given; at most 4"),
    (GenerationRequest(text="hi", stop=("a", "b" * 11)), "--max-stop-length", "a stop string is 11 characters; at "
                                                                              "most 10"),
])
def test_over_a_limit_is_refused_before_tokenising_naming_the_flag(request_: GenerationRequest, flag: str,
                                                                   words: str) -> None:
    router, tokenizer = _router(max_prompt_bytes=100, max_stop_strings=4, max_stop_length=10)
    refused = _refusal(router, request_)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert flag in refused.message and words in refused.message
    assert tokenizer.threads == []


def test_at_the_limits_a_request_is_admitted() -> None:
    router, _ = _router(max_prompt_bytes=100, max_stop_strings=4, max_stop_length=10)
    seq = asyncio.run(router.admit(GenerationRequest(text="x" * 100, stop=("b" * 10,) * 4)))
    assert seq.prompt_len == 100 and router.fleet.placed == [seq]


def test_a_full_queue_is_refused_before_tokenising() -> None:
    router, tokenizer = _router(max_queue=0)
    refused = _refusal(router, GenerationRequest(text="hello"))
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue 0" in refused.message
    assert tokenizer.threads == []


def test_token_ids_beyond_the_context_are_refused_by_their_count() -> None:
    router, _ = _router()
    router.fleet.max_context = 8
    refused = _refusal(router, GenerationRequest(token_ids=(10 ** 6,) * 9))  # out of vocabulary too: count first
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and "context holds 8" in refused.message


def test_prompts_are_tokenised_off_the_event_loop_holding_their_place_and_id() -> None:
    async def scenario() -> None:
        router, tokenizer = _router(max_queue=1)
        tokenizer.release.clear()  # the first request stays in its tokenisation
        first = asyncio.get_running_loop().create_task(router.admit(GenerationRequest(text="abc", request_id="one")))
        while not tokenizer.threads:
            await asyncio.sleep(0.01)
        assert tokenizer.threads[0] is not threading.current_thread()
        assert router.queued == 1
        for request, code in ((GenerationRequest(text="x", request_id="one"), grpc.StatusCode.ALREADY_EXISTS),
                              (GenerationRequest(text="x", request_id="two"), grpc.StatusCode.RESOURCE_EXHAUSTED)):
            with pytest.raises(RequestError) as caught:
                await router.admit(request)
            assert caught.value.code == code
        tokenizer.release.set()
        seq = await first
        assert seq.tokens == [ord(c) % 97 for c in "abc"] and router.tokenizing == set()
        router.fleet.placed.clear()  # a step loop took it
        chat = await router.admit(GenerationRequest(chat=(("user", "hi"),), request_id="three"))
        assert chat.prompt_len == len("<user>hi<assistant>")
        router.close()

    asyncio.run(scenario())


def test_utf8_size_counts_bytes() -> None:
    assert [utf8_size(t) for t in ("", "abc", "é", "日本", "\U0001f600", "\ud800")] == [0, 3, 2, 6, 4, 3]


def test_seq_ids_are_unguessable_and_requests_belong_to_the_key_that_started_them() -> None:
    from specfleet.security import Access

    async def scenario() -> None:
        router, _ = _router()
        router.access = Access(frozenset({"alice", "bob", "root"}), frozenset({"root"}))
        mine = await router.admit(GenerationRequest(text="abc", request_id="a"), [("authorization", "Bearer alice")])
        theirs = await router.admit(GenerationRequest(text="abc", request_id="b"), [("authorization", "Bearer bob")])
        for seq in (mine, theirs):
            router.requests[seq.request_id] = seq
        prefix, _, secret = mine.seq_id.partition("-")
        assert prefix == "r" and len(secret) == 24 and secret != theirs.seq_id.partition("-")[2]  # 96 random bits
        assert mine.owner == Access.caller("alice") and "alice" not in mine.owner  # a digest, not the key
        assert not router.abort("a", "bob") and not mine.finished  # not hers to end
        assert router.abort("a", "alice") and mine.finished
        assert router.abort("b", "root")  # an admin may

    asyncio.run(scenario())


@pytest.mark.parametrize(("request_", "words"), [
    (GenerationRequest(text="hi", seed=1 << 64), "seed must be in [0, 2^64)"),
    (GenerationRequest(text="hi", seed=-1), "seed must be in [0, 2^64)"),
    (GenerationRequest(text="hi", top_k=10 ** 20), "top_k must be at most"),
    (GenerationRequest(text="hi", request_id="x" * 257), "request_id is 257 characters; at most 256"),
])
def test_values_the_wire_cannot_carry_are_refused_at_admission(request_: GenerationRequest, words: str) -> None:
    refused = _refusal(_router()[0], request_)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and words in refused.message
