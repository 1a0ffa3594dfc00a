"""What the OpenAI-compatible HTTP API costs against the gRPC API: the same chat requests, streamed through the same
router, at batch 1 and 16.

SmolLM2-135M target, ``ngram`` drafter at a fixed depth (so both APIs run the same steps), greedy, 10 chat prompts
(code edits and open questions). For each batch size B, B clients stream requests back to back (each prompt in turn)
through gRPC (``GenerateStream``) and through HTTP (``/v1/chat/completions`` with ``stream: true``): with the
official ``openai`` client, and with a lean client that reads the server-sent events as JSON lines (``httpx``), so
that what the client itself costs on a small machine shows apart from what the server costs. The APIs take turns in
a rotated order each round; tokens/s is all tokens streamed over the round's wall time, and the router's CPU seconds
per round (the same requests for every API) say where the time goes. Every API must stream the same text (greedy is
deterministic): the run stops if not.

    python -m bench.http_overhead                       # batch 1 and 16, 3 rounds
    python -m bench.http_overhead --batch-sizes 16 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai

from bench.common import fleet
from bench.prompts import MIXED
from specfleet.client import make_request, stream
from specfleet.launcher import free_port

Stream = Callable[[list[dict[str, str]], int], tuple[str, int]]  # (messages, max_tokens) -> (text, tokens)


def grpc_stream(address: str) -> Stream:
    def run(messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int]:
        text, tokens = [], 0
        for message in stream(address, make_request(chat=messages, max_new_tokens=max_tokens), timeout_s=1800):
            text.append(message.text)
            tokens += len(message.token_ids)
        return "".join(text), tokens
    return run


def http_stream(base_url: str, model: str) -> Stream:
    local = threading.local()  # one client (and connection pool) per thread, as separate users would have

    def run(messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int]:
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=1800)
        text, tokens = [], 0
        for chunk in local.client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return "".join(text), tokens
    return run


def raw_http_stream(base_url: str, model: str) -> Stream:
    local = threading.local()

    def run(messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=base_url, timeout=1800)
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        text, tokens = [], 0
        with local.client.stream("POST", "/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event["choices"]:
                    text.append(event["choices"][0]["delta"].get("content") or "")
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        return "".join(text), tokens
    return run


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(run: Stream, prompts: list[list[dict[str, str]]], batch: int, requests: int, max_tokens: int
          ) -> tuple[float, dict[int, str]]:
    """``batch`` clients stream ``requests`` requests (prompts in turn), each sending its next when its last ends;
    tokens/s over the wall time, and each prompt's text."""
    lock, next_request, tokens, texts = threading.Lock(), [0], [0], {}

    def client() -> None:
        while True:
            with lock:
                i = next_request[0]
                next_request[0] += 1
            if i >= requests:
                return
            text, n = run(prompts[i % len(prompts)], max_tokens)
            with lock:
                tokens[0] += n
                texts.setdefault(i % len(prompts), text)

    threads = [threading.Thread(target=client) for _ in range(batch)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0] / (time.perf_counter() - start), texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per batch size (medians are reported)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--depth", default="4", help="the router's --depth (a fixed depth keeps the steps alike)")
    args = parser.parse_args()
    prompts = [[{"role": "user", "content": p}] for p in MIXED[:10]]
    http_port = free_port()
    with fleet() as f:
        slots = ["--num-slots", str(max(args.batch_sizes)), "--max-seq-len", "1024"]
        target = f.start("target", ["--model", "smollm2-135m", *slots], "target")
        draft = f.start("draft", ["--drafter", "ngram"], "draft")
        router = f.router(target, draft, args.depth, "router", ["--http-port", str(http_port)])
        base_url = f"http://127.0.0.1:{http_port}/v1"
        model = openai.OpenAI(base_url=base_url, api_key="unused").models.list().data[0].id
        apis = {"gRPC": grpc_stream(router), "HTTP, openai client": http_stream(base_url, model),
                "HTTP, lean client": raw_http_stream(base_url, model)}
        router_pid = next(p.popen.pid for p in f.deployment.processes if p.name == "router")
        serve(apis["gRPC"], prompts, 1, len(prompts), 8)  # warm-up: every prompt's first pass
        rows = []
        for batch in args.batch_sizes:
            requests = max(len(prompts), 2 * batch)
            rates: dict[str, list[float]] = {name: [] for name in apis}
            cpu: dict[str, list[float]] = {name: [] for name in apis}  # the router's CPU seconds per round
            client_cpu: dict[str, list[float]] = {name: [] for name in apis}  # the clients' (this process's)
            for r in range(args.rounds):
                names = list(apis)
                order = names[r % len(names):] + names[:r % len(names)]
                texts = {}
                for name in order:
                    before, client_before = cpu_seconds(router_pid), time.process_time()
                    rate, texts[name] = serve(apis[name], prompts, batch, requests, args.max_new_tokens)
                    rates[name].append(rate)
                    cpu[name].append(cpu_seconds(router_pid) - before)
                    client_cpu[name].append(time.process_time() - client_before)
                    print(f"  batch {batch} round {r + 1}: {name} {rate:.1f} tokens/s", flush=True)
                if len({tuple(sorted(t.items())) for t in texts.values()}) != 1:
                    raise AssertionError(f"the APIs streamed different text at batch {batch}")
            rows.append((batch, rates, cpu, client_cpu))
    print("\n| batch | API | tokens/s | / gRPC, median of rounds | per round | router CPU s, median | "
          "client CPU s, median |")
    print("| ---: | --- | ---: | ---: | --- | ---: | ---: |")
    for batch, rates, cpu, client_cpu in rows:
        for name in rates:
            ratios = [x / g for x, g in zip(rates[name], rates["gRPC"], strict=True)]
            print(f"| {batch} | {name} | {statistics.median(rates[name]):.1f} | {statistics.median(ratios):.2f} | "
                  f"{', '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(cpu[name]):.1f} | "
                  f"{statistics.median(client_cpu[name]):.1f} |")


if __name__ == "__main__":
    main()
