"""A CPU fleet on llama.cpp: specfleet with a llamacpp target (`specfleet target --backend llamacpp`) against
llama.cpp's own plain decoding of the same GGUF, at batch 1 and 8, on the code-editing prompts (which repeat their
input: prompt lookup's case) and on the mixed set (code editing and open questions).

Every configuration runs the prompts greedily; every specfleet output must equal llama.cpp's plain output in exact
micro-batches token for token (the llamacpp target is lossless with respect to llama.cpp decoding its GGUF one token
at a time), or the run stops.

    python -m bench.llamacpp                                  # SmolLM2-135M Q4_1, ngram drafts
    python -m bench.llamacpp --model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b   # and a llamacpp draft

llama.cpp plain is a llama.cpp context with the default context parameters decoding one token per sequence per
``llama_decode``: at batch 8 the 8 sequences together (what a llama.cpp server's continuous batching does). It runs
in this process with ``--threads``; the specfleet target gets ``--target-threads`` while its router and draft service
share the machine's cores. Two more plain rows: the same in exact micro-batches (prefills split as the llamacpp target
splits them, so every token's logits are those of one-token decoding: the reference every specfleet row must equal;
plain llama.cpp prefills in wide micro-batches, whose other rounding can flip a near-tie), and llama-cpp-python's
``Llama.generate`` at batch 1 (what most users run; its ``Llama`` class also turns flash attention off).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import chat_ids, fleet, specfleet_generate
from bench.prompts import CODE_EDITING, MIXED
from specfleet.engine import Extend
from specfleet.llamacpp import LlamaCppRunner, import_llama_cpp
from specfleet.models import load_gguf_tokenizer, resolve_gguf

PROMPT_SETS = {"code-edit": CODE_EDITING, "mixed": MIXED}
PLAIN = "llama.cpp plain"
EXACT = "llama.cpp plain, exact"  # the reference: see the module's docstring
HIGH_LEVEL = "llama-cpp-python Llama"  # timed, not compared: see the module's docstring


@dataclass
class Row:
    """One configuration on one prompt set and batch size: per round, (wall seconds, tokens) of each batch."""

    rounds: list[list[tuple[float, list[list[int]]]]] = field(default_factory=list)

    def tokens_per_s(self) -> float:
        """Median over rounds of all tokens generated / all wall seconds of the round's batches."""
        return statistics.median(sum(len(t) for _, batch in r for t in batch) / sum(s for s, _ in r)
                                 for r in self.rounds)

    def outputs(self) -> list[list[int]]:
        """The last round's tokens, prompt by prompt."""
        return [tokens for _, batch in self.rounds[-1] for tokens in batch]


def llama_cpp_single(gguf_path: str, threads: int, stops: set[int], max_new: int
                     ) -> Callable[[list[int]], list[int]]:
    """llama-cpp-python's own greedy generation of one prompt, stopping at llama.cpp's end-of-generation tokens."""
    import_llama_cpp("bench.llamacpp")
    from llama_cpp import Llama

    llm = Llama(gguf_path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)

    def generate(ids: list[int]) -> list[int]:
        llm.reset()
        tokens: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            tokens.append(token)
            if len(tokens) == max_new or token in stops:
                break
        return tokens

    return generate


def llama_cpp_batched(runner: LlamaCppRunner, stops: set[int], max_new: int
                      ) -> Callable[[list[list[int]]], list[list[int]]]:
    """Plain greedy decoding of several prompts together: their prompts in one decode, then one token of each live
    sequence per decode (llama.cpp's batched decoding, as its server does it)."""
    def generate(prompts: list[list[int]]) -> list[list[int]]:
        names = [f"plain{n}" for n in range(len(prompts))]
        outputs: list[list[int]] = [[] for _ in prompts]
        logits = runner.extend([Extend(name, 0, ids) for name, ids in zip(names, prompts, strict=True)])
        live = list(range(len(prompts)))
        while live:
            for n, rows in zip(live, logits, strict=True):
                outputs[n].append(int(rows[-1].argmax()))
            live = [n for n in live if len(outputs[n]) < max_new and outputs[n][-1] not in stops]
            if live:
                logits = runner.extend([Extend(names[n], len(prompts[n]) + len(outputs[n]) - 1, [outputs[n][-1]])
                                        for n in live])
        runner.release(names)
        return outputs

    return generate


@contextmanager
def specfleet_routers(args: argparse.Namespace) -> Iterator[dict[str, str]]:
    """A llamacpp target (which also drafts by prompt lookup for `--self-draft` routers), an ngram draft, a llamacpp
    draft (with --draft-model) and a router per configuration; the routers' addresses by configuration name."""
    with fleet(args.log_dir) as f:
        redis = ["--redis-url", f.redis()]
        slots = ["--num-slots", "8", "--max-seq-len", "2048"]
        # The target also looks drafts up itself (--prompt-lookup-depth) for the routers that ask it (--self-draft).
        target = f.start("target", ["--backend", "llamacpp", "--model", args.model, *slots,
                                    "--threads", str(args.target_threads), *redis,
                                    "--prompt-lookup-depth", str(max(args.depths))], "target")
        ngram = f.start("draft", ["--drafter", "ngram", *redis], "draft-ngram")
        routers = {"specfleet depth 0": f.router(target, None, 0, "router-0", redis)}
        for depth in args.depths:
            routers[f"specfleet ngram d{depth}"] = f.router(target, ngram, depth, f"router-ngram-{depth}", redis)
        routers["specfleet ngram auto"] = f.router(target, ngram, "auto", "router-ngram-auto", redis)
        self_draft = [*redis, "--self-draft"]
        for depth in args.depths:
            routers[f"specfleet lookup in target d{depth}"] = f.router(target, None, depth, f"router-lookup-{depth}",
                                                                       self_draft)
        routers["specfleet lookup in target auto"] = f.router(target, None, "auto", "router-lookup-auto", self_draft)
        if args.draft_model:
            llama = f.start("draft", ["--drafter", "llamacpp", "--model", args.draft_model, *slots,
                                      "--threads", str(args.draft_threads), *redis], "draft-llamacpp")
            for depth in args.depths:
                routers[f"specfleet llamacpp d{depth}"] = f.router(target, llama, depth, f"router-llama-{depth}",
                                                                   redis)
            routers["specfleet llamacpp auto"] = f.router(target, llama, "auto", "router-llama-auto", redis)
        yield routers


def timed_batches(generate_batch: Callable[[list[list[int]]], list[list[int]]], prompts: list[list[int]],
                  batch: int) -> list[tuple[float, list[list[int]]]]:
    out = []
    for start in range(0, len(prompts), batch):
        group = prompts[start: start + batch]
        began = time.perf_counter()
        tokens = generate_batch(group)
        out.append((time.perf_counter() - began, tokens))
    return out


def run(args: argparse.Namespace) -> dict[tuple[str, int, str], Row]:
    gguf = resolve_gguf(args.model)
    tokenizer = load_gguf_tokenizer(gguf)
    sets = {name: [chat_ids(tokenizer, p) for p in PROMPT_SETS[name]] for name in args.sets}
    plain_runner = LlamaCppRunner(gguf, num_slots=max(args.batches), max_seq_len=2048, threads=args.threads)
    exact_runner = LlamaCppRunner(gguf, num_slots=max(args.batches), max_seq_len=2048, threads=args.threads,
                                  batch_invariant=True)
    stops = set(plain_runner.eos_token_ids)
    single = llama_cpp_single(str(gguf), args.threads, stops, args.max_new_tokens)

    rows: dict[tuple[str, int, str], Row] = {}
    with specfleet_routers(args) as routers, ThreadPoolExecutor(max(args.batches)) as pool:
        def through(address: str) -> Callable[[list[list[int]]], list[list[int]]]:
            return lambda group: list(pool.map(
                lambda ids: specfleet_generate(address, ids, args.max_new_tokens).tokens, group))

        # Each configuration generates a batch of prompts together (llama-cpp-python's Llama: one after another).
        configs: dict[str, Callable[[list[list[int]]], list[list[int]]]] = {
            PLAIN: llama_cpp_batched(plain_runner, stops, args.max_new_tokens),
            EXACT: llama_cpp_batched(exact_runner, stops, args.max_new_tokens),
            HIGH_LEVEL: lambda group: [single(ids) for ids in group],
            **{name: through(address) for name, address in routers.items()},
        }
        for generate in configs.values():  # warm every path once: first decodes and first steps pay one-off costs
            generate([sets[args.sets[0]][0]])
        for round_index in range(args.rounds):
            for set_name, prompts in sets.items():
                for batch in args.batches:
                    for name, generate in configs.items():
                        if name == HIGH_LEVEL and batch > 1:
                            continue
                        row = rows.setdefault((set_name, batch, name), Row())
                        row.rounds.append(timed_batches(generate, prompts, batch))
                        print(f"  round {round_index + 1} {set_name} batch {batch}: {name:<28} "
                              f"{sum(len(t) for _, b in row.rounds[-1] for t in b):5d} tokens "
                              f"{sum(s for s, _ in row.rounds[-1]):7.2f} s", flush=True)
                    check_lossless(rows, set_name, batch)
    plain_runner.close()
    exact_runner.close()
    return rows


def check_lossless(rows: dict[tuple[str, int, str], Row], set_name: str, batch: int) -> None:
    """Every specfleet configuration's greedy tokens must be exact llama.cpp plain's at batch 1: a benchmark of a
    wrong answer is void. The other plain rows are only reported when they differ."""
    expected = rows[(set_name, 1, EXACT)].outputs()
    for (s, b, name), row in rows.items():
        if (s, b) != (set_name, batch) or row.outputs() == expected:
            continue
        if name in (PLAIN, HIGH_LEVEL):
            differing = sum(got != want for got, want in zip(row.outputs(), expected, strict=True))
            print(f"  note: {name} at batch {batch} differs from {EXACT} on {differing} of {len(expected)} prompts")
        else:
            first = next(n for n, (got, want) in enumerate(zip(row.outputs(), expected, strict=True)) if got != want)
            raise AssertionError(f"{name} at batch {batch} differs from llama.cpp plain on {set_name} prompt "
                                 f"{first + 1}")


def table(rows: dict[tuple[str, int, str], Row]) -> str:
    lines = ["| prompts | batch | configuration | tokens/s | vs llama.cpp plain |",
             "| --- | ---: | --- | ---: | ---: |"]
    for (set_name, batch, name), row in rows.items():
        plain = rows[(set_name, batch, PLAIN)].tokens_per_s()
        lines.append(f"| {set_name} | {batch} | {name} | {row.tokens_per_s():.1f} | "
                     f"{row.tokens_per_s() / plain:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the target: a preset or a .gguf file")
    parser.add_argument("--draft-model", default="", help="also draft with this GGUF by llama.cpp (a preset or a "
                        ".gguf sharing the target's tokenizer); empty: ngram drafts only")
    parser.add_argument("--sets", nargs="+", default=list(PROMPT_SETS), choices=list(PROMPT_SETS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp plain's threads")
    parser.add_argument("--target-threads", type=int, default=2, help="the specfleet llamacpp target's threads")
    parser.add_argument("--draft-threads", type=int, default=1, help="the llamacpp draft's threads")
    parser.add_argument("--log-dir", type=Path, help="keep the services' logs here, at INFO (the routers' depth "
                        "decisions among them)")
    args = parser.parse_args()
    if 1 not in args.batches:
        parser.error("--batches must include 1: every output is checked against llama.cpp plain at batch 1")
    rows = run(args)
    print(f"\n{args.model} on llama.cpp, {args.max_new_tokens} new tokens, greedy, median of {args.rounds} rounds\n")
    print(table(rows))


if __name__ == "__main__":
    main()
