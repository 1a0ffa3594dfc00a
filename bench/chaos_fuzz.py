"""The fuzz of ``bench.chaos`` (scenario 5): random mixes of bad and odd requests for the router's gRPC and OpenAI
APIs. Only the cases are made here, reproducibly from a seed; ``bench.chaos`` sends them and counts the answers."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

from specfleet.client import make_request
from specfleet.protos import generate_pb2

PROMPTS = ["def add(a, b):", "The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
MAX_NEW_TOKENS_CAP = 4096  # the router's default --max-new-tokens-cap: one past it is out of range


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
    r.stopping.max_new_tokens = rng.choice([0, -1, -(2**31), MAX_NEW_TOKENS_CAP + 1, 10**6, 2**31 - 1])
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
