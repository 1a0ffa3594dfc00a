"""Shared pieces of the benchmarks: timing transformers' generate, running a real specfleet
deployment, and printing tables."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from specfleet.launcher import Deployment, free_port, wait_redis, wait_serving
from specfleet.protos import generate_pb2, generate_pb2_grpc


@dataclass
class Run:
    """One request: tokens generated, wall seconds, and the speculation stats when specfleet served it."""

    tokens: list[int]
    seconds: float
    steps: int = 0
    drafted: int = 0
    accepted: int = 0


@dataclass
class Tally:
    """All requests of one configuration, over all rounds."""

    rounds: list[list[Run]] = field(default_factory=list)

    def tokens_per_s(self) -> float:
        """Median over rounds of (tokens generated / seconds) summed over the round's prompts."""
        return statistics.median(sum(len(r.tokens) for r in runs) / sum(r.seconds for r in runs)
                                 for runs in self.rounds)

    def _all(self) -> list[Run]:
        return [r for runs in self.rounds for r in runs]

    def accepted_per_step(self) -> float | None:
        runs = self._all()
        steps = sum(r.steps for r in runs)
        return sum(r.accepted for r in runs) / steps if steps else None

    def acceptance(self) -> float | None:
        runs = self._all()
        drafted = sum(r.drafted for r in runs)
        return sum(r.accepted for r in runs) / drafted if drafted else None


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def hf_generate(model, ids: list[int], max_new_tokens: int, **kwargs) -> Run:
    """transformers' greedy generate, timed; stops at EOS like the server does."""
    inputs = torch.tensor([ids])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                             do_sample=False, **kwargs)
    return Run(out[0, len(ids):].tolist(), time.perf_counter() - start)


def specfleet_generate(address: str, ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> Run:
    """One greedy request through a router, timed from the call to the last byte of the answer."""
    request = generate_pb2.GenerateRequest()
    request.token_ids.ids.extend(ids)
    request.stopping.max_new_tokens = max_new_tokens
    request.stopping.ignore_eos = ignore_eos
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        start = time.perf_counter()
        reply = stub.Generate(request, timeout=1800)
        seconds = time.perf_counter() - start
    s = reply.stats
    return Run(list(reply.token_ids), seconds, s.steps, s.drafted_tokens, s.accepted_tokens)


def service_args(role: str, args: list[str]) -> list[str]:
    """``args`` for a service of ``role``; a target or draft computes every prompt in full unless they say otherwise:
    a benchmark sends the same prompts to each configuration (and each round), and reusing the first one's prefill
    would time the rows after it without theirs."""
    if role in ("target", "draft") and "--prefix-reuse" not in args:
        return [*args, "--prefix-reuse", "off"]
    return args


class Fleet:
    """A real deployment (target, drafts, routers as processes) for a benchmark."""

    def __init__(self, deployment: Deployment, log_level: str = "WARNING") -> None:
        self.deployment = deployment
        self.log_level = log_level

    def start(self, role: str, args: list[str], name: str) -> str:
        port = free_port()
        process = self.deployment.start_service(role, [*service_args(role, args), "--port", str(port), "--log-level",
                                                       self.log_level], name=name)
        address = f"127.0.0.1:{port}"
        wait_serving(process, address, timeout_s=1800)
        return address

    def redis(self) -> str:
        """A redis-server for this fleet's telemetry; returns its URL."""
        port = free_port()
        wait_redis(self.deployment.start_redis(port), port)
        return f"redis://127.0.0.1:{port}/0"

    def router(self, target: str, draft: str | None, depth: int | str, name: str, extra: list[str] = ()) -> str:
        return self.start("router", ["--targets", target, "--drafts", draft or "", "--depth", str(depth),
                                     *extra], name)


@contextmanager
def fleet(log_dir: Path | None = None) -> Iterator[Fleet]:
    with tempfile.TemporaryDirectory() as tmp, Deployment(log_dir or Path(tmp)) as deployment:
        # Logs that are kept are read: at INFO they carry the router's depth decisions as well.
        yield Fleet(deployment, "WARNING" if log_dir is None else "INFO")


def run_rounds(configs: dict[str, Callable[[list[int]], Run]], prompts: list[list[int]], rounds: int,
               check_equal_to: str | None = None) -> dict[str, Tally]:
    """Runs every configuration over all prompts, round-robin per prompt so that slow drifts of the
    machine hit all configurations alike. With ``check_equal_to``, every configuration's tokens must
    equal that configuration's (greedy speculation is lossless; a benchmark of a wrong answer is void)."""
    tallies = {name: Tally() for name in configs}
    for round_index in range(rounds):
        for tally in tallies.values():
            tally.rounds.append([])
        for p, ids in enumerate(prompts):
            for name, generate in configs.items():
                run = generate(ids)
                tallies[name].rounds[-1].append(run)
                print(f"  round {round_index + 1} prompt {p + 1}: {name:<24} {len(run.tokens):4d} tokens "
                      f"{run.seconds:7.2f} s", flush=True)
            if check_equal_to is not None:
                expected = tallies[check_equal_to].rounds[-1][-1].tokens
                for name, tally in tallies.items():
                    got = tally.rounds[-1][-1].tokens
                    if got != expected:
                        raise AssertionError(f"{name} differs from {check_equal_to} on prompt {p + 1}: "
                                             f"{got[:16]}... vs {expected[:16]}...")
    return tallies


def table(title: str, tallies: dict[str, Tally], baseline: str) -> str:
    base = tallies[baseline].tokens_per_s()
    lines = [f"### {title}", "",
             "| configuration | tokens/s | vs HF plain | accepted tokens/step | acceptance rate |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, tally in tallies.items():
        rate = tally.tokens_per_s()
        per_step, acceptance = tally.accepted_per_step(), tally.acceptance()
        lines.append(f"| {name} | {rate:.1f} | {rate / base:.2f}x | "
                     f"{'-' if per_step is None else f'{per_step:.2f}'} | "
                     f"{'-' if acceptance is None else f'{acceptance:.0%}'} |")
    return "\n".join(lines)
