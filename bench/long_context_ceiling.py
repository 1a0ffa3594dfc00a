"""The most sparse_self drafting (MagicDec) can gain over plain decoding on this machine at long contexts, whatever
the server around it does: each cell's speedup from measured forward times and measured acceptance, with no
transport, no Python around the forwards and no prefill.

    python -m bench.long_context_ceiling                     # 4K and 7K, batch 1, 8 and 16, float32 and bfloat16 drafts
    python -m bench.long_context_ceiling --contexts 4096 --batches 8 --depths 1 2 3 --draft-dtypes bfloat16

Acceptance: a few long standard-library modules under a "summarise" turn, cut to the context as `bench.long_context`
cuts them, decoded greedily by the engine; then each sparse draft run once over every prompt and its output
(teacher-forced: what it would draft at every position given the true tokens before it). A chain of depth d drafted
at position p keeps its drafts while they equal the output, so its accepted length is the run of positions from p
where the draft's choice is the output's token, at most d; a step then commits that plus one. Replaying each output
this way gives tokens per step at each depth, as a lossless greedy server would commit them.

Costs, per context and batch: the target (`ModelRunner.extend`) verifying 1 to 1 + max depth tokens for each of
``batch`` sequences of ``context`` cached tokens (logits at every new token), and each draft (`StreamingRunner.extend`,
16 sinks + a 240-token window) making a level for ``batch`` sequences, 1 or 2 tokens each (two after a step that kept
every draft: the last draft and the target's token); caches filled with random keys and values; every forward of
the cell timed in turns, medians of the rounds. A step at depth d costs the verify of d + 1 tokens and d draft
levels, the first priced by how often the replay's previous step kept every draft.

Speedup = (batch x tokens per step / step time) / (batch / one-token forward time). Printed twice: with the draft
free (the verify alone: what a draft that costs nothing would reach) and with the draft as measured. A server adds
its round trips and bookkeeping to every step, so the speedups it measures sit below these.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from bench.engine_vs_hf import fill_random_cache
from bench.long_context import MODEL, MODEL_CONTEXT, SPARSE_SINKS, SPARSE_WINDOW, summarise_code_prompts
from specfleet.engine import Extend, ModelRunner
from specfleet.engine.llama import LlamaForCausalLM
from specfleet.engine.runner import load_model, set_cpu_threads
from specfleet.engine.streaming import StreamingRunner, StreamingWindow
from specfleet.models import load_tokenizer, resolve_model

# ---------------------------------------------------------------------------------------------------------------
# acceptance, from greedy outputs replayed


def greedy_outputs(model: LlamaForCausalLM, prompts: Sequence[list[int]], max_new: int) -> list[list[int]]:
    """The target's greedy continuation of every prompt, decoded together, ``max_new`` tokens each (EOS ignored,
    as the long-context benchmark ignores it)."""
    runner = ModelRunner(model, num_slots=len(prompts), max_seq_len=max(map(len, prompts)) + max_new)
    names = [f"p{i}" for i in range(len(prompts))]
    logits = runner.extend([Extend(n, 0, list(p)) for n, p in zip(names, prompts, strict=True)])
    outs = [[int(row[-1].argmax())] for row in logits]
    while len(outs[0]) < max_new:
        logits = runner.extend([Extend(n, len(p) + len(o) - 1, [o[-1]])
                                for n, p, o in zip(names, prompts, outs, strict=True)])
        for out, row in zip(outs, logits, strict=True):
            out.append(int(row[-1].argmax()))
    return outs


def draft_choices(draft: StreamingRunner, prompt: list[int], out: list[int]) -> list[int]:
    """What the draft would propose at each position of ``out`` given the true tokens before it: choice[j] is its
    greedy token after prompt + out[:j]."""
    logits = draft.extend([Extend("replay", 0, prompt + out[:-1], num_logits=len(out))])[0]
    draft.release(["replay"])
    return logits.argmax(dim=-1).tolist()


@dataclass(frozen=True)
class Replay:
    """A depth's greedy chain drafting over the outputs: steps taken, tokens committed after each request's first,
    and steps whose previous step kept every draft (their first draft level takes two tokens)."""

    steps: int
    tokens: int
    after_full: int

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps

    @property
    def full_share(self) -> float:
        return self.after_full / self.steps


def replay(outputs: Sequence[list[int]], choices: Sequence[list[int]], depth: int) -> Replay:
    """Chains of up to ``depth`` drafts over each output from its second token (the first is the prefill's)."""
    steps = tokens = after_full = 0
    for out, chose in zip(outputs, choices, strict=True):
        position, full = 1, False
        while position < len(out):
            room = min(depth, len(out) - position - 1)
            accepted = 0
            while accepted < room and chose[position + accepted] == out[position + accepted]:
                accepted += 1
            steps += 1
            after_full += full
            full = accepted == depth
            tokens += accepted + 1
            position += accepted + 1
    return Replay(steps, tokens, after_full)


# ---------------------------------------------------------------------------------------------------------------
# costs


Forward = Callable[[int], None]
"""One forward appending this many tokens to every sequence of a runner, rolled back to where they were."""


def forwards_from(runner: ModelRunner, names: list[str], length: int, every_logit: bool) -> Forward:
    """Forwards appending to ``names`` after ``length`` tokens, with the logits of every new token (a verify) or of
    the last (a draft level)."""
    def forward(width: int) -> None:
        runner.extend([Extend(name, length, [(7 * i + j) % 1000 + 1 for j in range(width)],
                              num_logits=width if every_logit else 1) for i, name in enumerate(names)])

    return forward


def target_side(model: LlamaForCausalLM, batch: int, context: int, max_width: int) -> tuple[ModelRunner, Forward]:
    """The target with ``batch`` sequences of ``context`` cached tokens, verifying."""
    runner = ModelRunner(model, num_slots=batch, max_seq_len=context + max_width)
    return runner, forwards_from(runner, fill_random_cache(runner, batch, context), context, every_logit=True)


def draft_side(model: LlamaForCausalLM, window: StreamingWindow, batch: int) -> tuple[StreamingRunner, Forward]:
    """The sparse draft with ``batch`` sequences whose caches hold a full window (with its rollback room), as
    after any long prompt."""
    runner = StreamingRunner(model, num_slots=batch, window=window, max_seq_len=MODEL_CONTEXT)
    held = window.sinks + window.window + window.reach
    return runner, forwards_from(runner, fill_random_cache(runner, batch, held), held, every_logit=False)


def interleaved_ms(calls: dict[Any, Callable[[], None]], repeats: int) -> dict[Any, float]:
    """Each call's median ms over ``repeats`` rounds after a warm one, the calls taking turns in every round so
    that a slow moment of this noisy machine falls on all of them alike."""
    for call in calls.values():
        call()
    times: dict[Any, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(ms) for name, ms in times.items()}


@dataclass(frozen=True)
class Costs:
    verify_ms: dict[int, float]  # by tokens per sequence (1: a plain decoding step)
    level_ms: dict[str, dict[int, float]]  # per draft: a level, by tokens per sequence (1 or 2)


def measure_costs(target: LlamaForCausalLM, drafts: dict[str, LlamaForCausalLM], window: StreamingWindow,
                  context: int, batch: int, widths: Sequence[int], repeats: int) -> Costs:
    """A cell's verifies of every width and every draft's levels, timed in turns."""
    target_runner, verify = target_side(target, batch, context, max(widths))
    levels = {name: draft_side(model, window, batch) for name, model in drafts.items()}
    calls = {(None, w): partial(verify, w) for w in widths}
    calls |= {(name, w): partial(level, w) for name, (_, level) in levels.items() for w in (1, 2)}
    ms = interleaved_ms(calls, repeats)
    del target_runner, levels
    gc.collect()
    return Costs({w: ms[(None, w)] for w in widths}, {name: {w: ms[(name, w)] for w in (1, 2)} for name in drafts})


# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    context: int
    batch: int
    draft: str  # the draft's dtype
    depth: int
    tokens_per_step: float
    plain_ms: float
    verify_ms: float
    draft_ms: float

    @property
    def free_draft_speedup(self) -> float:
        return self.tokens_per_step * self.plain_ms / self.verify_ms

    @property
    def speedup(self) -> float:
        return self.tokens_per_step * self.plain_ms / (self.verify_ms + self.draft_ms)


def table(rows: Sequence[Row]) -> str:
    lines = ["| context | batch | draft | depth | tokens/step | plain ms/step | verify ms | draft ms/step | "
             "speedup, draft free | speedup, draft as measured |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.context} | {r.batch} | {r.draft} | {r.depth} | {r.tokens_per_step:.2f} | "
                     f"{r.plain_ms:.1f} | {r.verify_ms:.1f} | {r.draft_ms:.1f} | {r.free_draft_speedup:.2f}x | "
                     f"{r.speedup:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 7168])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per context for the acceptance replay")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--draft-dtypes", choices=["float32", "bfloat16"], nargs="+", default=["float32", "bfloat16"],
                        help="the sparse draft's weights and cache, one draft each (the target stays float32)")
    parser.add_argument("--repeats", type=int, default=9, help="rounds of timed forwards per cell")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    args = parser.parse_args()
    too_long = [c for c in args.contexts if c + args.max_new_tokens > MODEL_CONTEXT]
    if too_long:
        parser.error(f"contexts {too_long} plus {args.max_new_tokens} new tokens exceed the model's {MODEL_CONTEXT}")
    set_cpu_threads(args.threads)
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    folder = resolve_model(MODEL)
    tokenizer = load_tokenizer(folder)
    target = load_model(folder, dtype="float32")
    drafts = {dtype: target if dtype == "float32" else load_model(folder, dtype=dtype) for dtype in args.draft_dtypes}
    window = StreamingWindow(SPARSE_SINKS, SPARSE_WINDOW)
    widths = sorted({1, *(d + 1 for d in args.depths)})  # tokens per sequence a verify takes: plain, and each depth's
    rows: list[Row] = []
    for context in args.contexts:
        prompts = summarise_code_prompts(tokenizer, context, args.prompts)
        say(f"context {context}: decoding {len(prompts)} prompts greedily")
        outputs = greedy_outputs(target, prompts, args.max_new_tokens)
        replays = {}
        for dtype, draft in drafts.items():
            say(f"context {context}: the {dtype} draft over the prompts and outputs")
            replayer = StreamingRunner(draft, num_slots=1, window=window, max_seq_len=MODEL_CONTEXT)
            choices = [draft_choices(replayer, p, o) for p, o in zip(prompts, outputs, strict=True)]
            del replayer
            replays[dtype] = {d: replay(outputs, choices, d) for d in args.depths}
            matched = sum(c == t for chose, out in zip(choices, outputs, strict=True)
                          for c, t in zip(chose[1:], out[1:], strict=True))
            say(f"context {context}: the {dtype} draft's choice is the target's token at {matched}/"
                f"{len(prompts) * (args.max_new_tokens - 1)} positions; tokens/step "
                + ", ".join(f"d{d} {r.tokens_per_step:.2f}" for d, r in replays[dtype].items()))
        for batch in args.batches:
            costs = measure_costs(target, drafts, window, context, batch, widths, args.repeats)
            verify = costs.verify_ms
            say(f"context {context} batch {batch}: target ms by width "
                + ", ".join(f"{w}: {ms:.1f}" for w, ms in verify.items()) + "; draft level ms by width "
                + "; ".join(f"{dtype} " + ", ".join(f"{w}: {ms:.1f}" for w, ms in level.items())
                            for dtype, level in costs.level_ms.items()))
            for dtype, level in costs.level_ms.items():
                for depth, r in replays[dtype].items():
                    first_level = level[1] + r.full_share * (level[2] - level[1])
                    rows.append(Row(context, batch, dtype, depth, r.tokens_per_step, verify[1], verify[depth + 1],
                                    first_level + (depth - 1) * level[1]))
            print(table([row for row in rows if (row.context, row.batch) == (context, batch)]), flush=True)
    print(f"\nSmolLM2-135M float32 target, sparse_self drafts ({SPARSE_SINKS} sinks + {SPARSE_WINDOW} window), greedy, "
          f"{args.max_new_tokens} new tokens, {args.prompts} prompts per context, {torch.get_num_threads()} threads\n")
    print(table(rows))


if __name__ == "__main__":
    main()
