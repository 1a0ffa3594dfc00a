"""DuoDecoding on this machine: a quantized llama.cpp draft on the CPU, drafting ahead while the target verifies.

Qwen2.5-Coder-1.5B target in specfleet's engine, Qwen2.5-Coder-0.5B draft, HumanEval prompts. Rows: transformers'
plain and assisted generation (batch 1, greedy), specfleet at depth 0, the ``model`` (PyTorch) drafter, the
``llamacpp`` drafter drafting then verifying, drafting DuoDecoding's several sequences with distinct first tokens
(``--tree duo --tree-branching 4``: up to 4, as many as the draft is unsure between), and drafting ahead
(``--draft-ahead``, also with ``--prefill-alongside``: the draft computes each prompt while the target does), each at
the depths given (the table keeps the best), and ``auto`` (llamacpp, drafting ahead, depth chosen per step; again
with prompts alongside); and llama.cpp's own plain decoding of the target's GGUF as a reference. Each specfleet row runs
unpinned and, with ``--pinned``, again with the draft service on one core and the target on the other
(``taskset``), which stands in for a CPU draft beside a GPU target. Tokens/s and time to first token (median per
request) for each row; greedy specfleet rows must be token-identical to depth 0 (the run stops if not).

    python -m bench.duo                                   # the full grid: batch 1 and 4, greedy and temperature 1
    python -m bench.duo --batches 1 --temperatures 0 --prompts 2 --max-new-tokens 32 --pinned   # a quick look
    python -m bench.duo --batches 1 --temperatures 0 --depths 3 --no-hf --pinned-only \
        --configs 'llamacpp d3' 'llamacpp ahead d3' 'llamacpp ahead d3 alongside'            # some rows, pinned
    python -m bench.duo --batches 1 --temperatures 0 --depths 3 --no-hf --rounds 3 \
        --configs 'llamacpp ahead d3' auto                   # two rows taking turns, three times: median round
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from bench.common import Fleet, chat_ids, fleet, hf_generate, service_args
from bench.prompts import humaneval_prompts
from specfleet.client import make_request, stream
from specfleet.launcher import free_port, wait_serving
from specfleet.models import load_tokenizer, resolve_gguf, resolve_model

TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"


@dataclass
class Timed:
    """One request: its tokens, seconds to its first and to its last token."""

    tokens: list[int]
    first_s: float
    total_s: float


Batches = list[tuple[float, list[Timed]]]  # one pass over the prompts: (wall seconds, requests) per batch


@dataclass
class Row:
    """One configuration's requests, batch by batch, in each round (one pass over the prompts)."""

    rounds: list[Batches] = field(default_factory=list)

    def tokens_per_s(self) -> float:
        """The median round's tokens/s."""
        return statistics.median(_rate(batches) for batches in self.rounds)

    def ttft_ms(self) -> float:
        return 1000 * statistics.median(t.first_s for batches in self.rounds for _, ts in batches for t in ts)

    def outputs(self) -> list[list[list[int]]]:
        """Each round's tokens, request by request."""
        return [[t.tokens for _, ts in batches for t in ts] for batches in self.rounds]


def _rate(batches: Batches) -> float:
    """Tokens/s over one pass."""
    return sum(len(t.tokens) for _, ts in batches for t in ts) / sum(s for s, _ in batches)


def _stream_timed(address: str, ids: list[int], max_new: int, temperature: float, seed: int) -> Timed:
    started = time.perf_counter()
    first, tokens = 0.0, []
    request = make_request(ids, max_new_tokens=max_new, temperature=temperature or None,
                           seed=seed if temperature else None)
    for message in stream(address, request, timeout_s=3600):
        if message.token_ids and not first:
            first = time.perf_counter() - started
        tokens.extend(message.token_ids)
    return Timed(tokens, first, time.perf_counter() - started)


def _batched(generate: Callable[[list[int], int], Timed], prompts: list[list[int]], batch: int) -> Batches:
    """The prompts in groups of ``batch`` sent at once (the router batches them), each group timed."""
    batches: Batches = []
    with ThreadPoolExecutor(batch) as pool:
        for start in range(0, len(prompts), batch):
            group = prompts[start: start + batch]
            began = time.perf_counter()
            timed = list(pool.map(generate, group, range(start, start + len(group))))
            batches.append((time.perf_counter() - began, timed))
    return batches


def _hf_timed(model, ids: list[int], seed: int, max_new: int, **kwargs) -> Timed:
    run = hf_generate(model, ids, max_new, **kwargs)
    return Timed(run.tokens, float("nan"), run.seconds)  # generate returns at the end: no first-token time


@contextmanager
def _services(pinned: bool, depths: list[int], threads: int, configs: list[str] | None = None,
              log_dir: Path | None = None) -> Iterator[dict[str, str]]:
    """A target, a model draft and a llamacpp draft (pinned: drafts on core 0, the target on core 1), with a
    router per configuration; their addresses by configuration name (only ``configs`` and depth 0, if given)."""
    with fleet(log_dir) as f:
        redis = ["--redis-url", f.redis()]
        slots = ["--num-slots", "4", "--max-seq-len", "2048"]
        target = _start(f, "target", ["--model", TARGET, *slots, *redis], "target", "1" if pinned else None)
        model = _start(f, "draft", ["--drafter", "model", "--model", DRAFT, *slots, "--cpu-prepack", "off", *redis],
                       "draft-model", "0" if pinned else None)
        llama = _start(f, "draft", ["--drafter", "llamacpp", "--model", DRAFT, *slots, *redis,
                                    "--threads", "1" if pinned else str(threads)], "draft-llamacpp",
                       "0" if pinned else None)
        routers = {"depth 0": f.router(target, None, 0, "router-0", redis)}
        for d in depths:
            routers[f"model d{d}"] = f.router(target, model, d, f"router-model-{d}", redis)
            routers[f"llamacpp d{d}"] = f.router(target, llama, d, f"router-llama-{d}", redis)
            routers[f"llamacpp duo d{d}"] = f.router(target, llama, d, f"router-duo-{d}",
                                                     [*redis, "--tree", "duo", "--tree-branching", "4"])
            routers[f"llamacpp ahead d{d}"] = f.router(target, llama, d, f"router-ahead-{d}",
                                                       [*redis, "--draft-ahead"])
            routers[f"llamacpp ahead d{d} alongside"] = f.router(target, llama, d, f"router-alongside-{d}",
                                                                 [*redis, "--draft-ahead", "--prefill-alongside"])
        routers["auto"] = f.router(target, llama, "auto", "router-auto", [*redis, "--draft-ahead"])
        routers["auto alongside"] = f.router(target, llama, "auto", "router-auto-alongside",
                                             [*redis, "--draft-ahead", "--prefill-alongside"])
        yield {name: address for name, address in routers.items() if name == "depth 0" or configs is None
               or name in configs}


def _start(f: Fleet, role: str, args: list[str], name: str, cpus: str | None) -> str:
    if cpus is None:
        return f.start(role, args, name)
    port = free_port()
    argv = ["taskset", "-c", cpus, sys.executable, "-m", "specfleet.cli", role, *service_args(role, args),
            "--port", str(port), "--log-level", f.log_level]
    process = f.deployment.start(name, argv, env={"OMP_NUM_THREADS": "1"})  # one core: one thread
    address = f"127.0.0.1:{port}"
    wait_serving(process, address, timeout_s=1800)
    return address


WARM_UP_TOKENS = 4


def _specfleet_rows(prompts: list[list[int]], args: argparse.Namespace, pinned: bool) -> dict[str, Row]:
    """Every configuration at every (temperature, batch) cell, ``args.rounds`` times, the configurations taking turns
    within each round (so a slow minute of the machine falls on all of them); pinned, at the first cell only (the
    time it takes)."""
    rows: dict[str, Row] = {}
    temperatures, batches = (args.temperatures[:1], args.batches[:1]) if pinned else (args.temperatures, args.batches)
    with _services(pinned, args.depths, args.threads, args.configs, args.log_dir) as routers:
        for temperature in temperatures:
            for batch in batches:
                for round_index in range(args.rounds):
                    for name, address in routers.items():
                        def generate(ids: list[int], seed: int, address: str = address,
                                     max_new: int = args.max_new_tokens, temperature: float = temperature) -> Timed:
                            return _stream_timed(address, ids, max_new, temperature, seed)

                        label = f"T={temperature:g} batch {batch} | specfleet {name}{' (pinned)' if pinned else ''}"
                        if round_index == 0:
                            # Warm-up: the first requests pay one-time costs (the router's connections, the policy's
                            # start).
                            _batched(partial(generate, max_new=WARM_UP_TOKENS), prompts[:batch], batch)
                        row = rows.setdefault(label, Row())
                        row.rounds.append(_batched(generate, prompts, batch))
                        rate = _rate(row.rounds[-1])
                        print(f"  {label}{f' (round {round_index + 1})' if args.rounds > 1 else ''}: {rate:.2f} tok/s",
                              flush=True)
                if temperature == 0:
                    _check_greedy(rows, batch, pinned)
    return rows


def _check_greedy(rows: dict[str, Row], batch: int, pinned: bool) -> None:
    prefix = f"T=0 batch {batch} | specfleet "
    suffix = " (pinned)" if pinned else ""
    expected = rows[f"{prefix}depth 0{suffix}"].outputs()[0]
    for label, row in rows.items():
        in_cell = label.startswith(prefix) and label.endswith(suffix) and (pinned or "(pinned)" not in label)
        if in_cell and any(output != expected for output in row.outputs()):
            raise AssertionError(f"{label} is not token-identical to depth 0")


def _hf_rows(prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Row]:
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(resolve_model(TARGET), dtype=torch.float32).eval()
    assistant = AutoModelForCausalLM.from_pretrained(resolve_model(DRAFT), dtype=torch.float32).eval()
    configs = {"HF generate": partial(_hf_timed, target, max_new=args.max_new_tokens),
               "HF assisted (0.5B)": partial(_hf_timed, target, max_new=args.max_new_tokens,
                                             assistant_model=assistant)}
    rows = {}
    for name, generate in configs.items():
        _batched(generate, prompts[:1], 1)
        rows[f"T=0 batch 1 | {name}"] = Row([_batched(generate, prompts, 1)])
    del target, assistant
    gc.collect()
    return rows


def _llama_cpp_plain(prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Row]:
    """llama.cpp's own greedy decoding of the target's GGUF (Q4_K_M), one prompt at a time."""
    from llama_cpp import Llama

    llm = Llama(str(resolve_gguf(TARGET)), n_ctx=2048, n_threads=args.threads, verbose=False)
    batches: Batches = []
    for ids in prompts:
        llm.reset()
        began, first, tokens = time.perf_counter(), 0.0, []
        for token in llm.generate(ids, temp=0.0, top_k=1):
            first = first or time.perf_counter() - began
            tokens.append(token)
            if len(tokens) == args.max_new_tokens or token == llm.token_eos():
                break
        batches.append((time.perf_counter() - began, [Timed(tokens, first, time.perf_counter() - began)]))
    return {"T=0 batch 1 | llama.cpp plain (1.5B Q4_K_M)": Row([batches])}


def table(rows: dict[str, Row]) -> str:
    lines = ["| temperature, batch | configuration | tokens/s | vs HF plain | vs depth 0 | TTFT ms |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    hf = rows.get("T=0 batch 1 | HF generate")
    for label, row in rows.items():
        cell, name = label.split(" | ")
        plain = rows.get(f"{cell} | specfleet depth 0{' (pinned)' if '(pinned)' in name else ''}")
        rate = row.tokens_per_s()
        vs_hf = f"{rate / hf.tokens_per_s():.2f}x" if hf is not None and cell.startswith("T=0 batch 1") else "-"
        vs_plain = f"{rate / plain.tokens_per_s():.2f}x" if plain is not None else "-"
        ttft = row.ttft_ms()
        lines.append(f"| {cell} | {name} | {rate:.2f} | {vs_hf} | {vs_plain} | "
                     f"{'-' if ttft != ttft else f'{ttft:.0f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, help="HumanEval prompts (a multiple of the batch sizes)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads, unpinned")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the prompts per specfleet row, the rows "
                        "taking turns; the table gives each row's median round")
    parser.add_argument("--pinned", action="store_true", help="run the specfleet rows pinned too (taskset), at the "
                        "first temperature and batch size")
    parser.add_argument("--pinned-only", action="store_true", help="run the specfleet rows pinned only")
    parser.add_argument("--configs", nargs="+", help="only these specfleet configurations, by row name, e.g. "
                        "'llamacpp ahead d3' (depth 0 always runs: greedy rows are checked against it)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' rows")
    parser.add_argument("--log-dir", type=Path, help="keep the services' logs here, at INFO (the routers' depth "
                        "decisions and their reasons)")
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model(TARGET))
    prompts = [chat_ids(tokenizer, p) for p in humaneval_prompts(args.prompts)]
    rows: dict[str, Row] = {} if args.no_hf else _hf_rows(prompts, args)
    rows |= _llama_cpp_plain(prompts, args)
    if not args.pinned_only:
        rows |= _specfleet_rows(prompts, args, pinned=False)
    if args.pinned or args.pinned_only:
        rows |= _specfleet_rows(prompts, args, pinned=True)
    print(f"\nQwen2.5-Coder-1.5B target (specfleet engine, float32), 0.5B draft, {len(prompts)} HumanEval prompts, "
          f"{args.max_new_tokens} new tokens\n")
    print(table(rows))


if __name__ == "__main__":
    main()
