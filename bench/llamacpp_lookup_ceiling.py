"""The most prompt lookup can gain over llama.cpp's plain decoding on this machine, whatever the server around it
does: the exact greedy outputs of the prompts replayed offline, each step drafting what prompt lookup finds (up to a
fixed depth) and priced by the measured time of one llama.cpp decode of that many tokens; no transport, no Python
around the decode, the prompts left out.

    python -m bench.llamacpp_lookup_ceiling                     # SmolLM2-135M Q4_1, code-edit and mixed prompts
    python -m bench.llamacpp_lookup_ceiling --depths 2 3 4 8

Prints the decode-cost curve, then per prompt set and depth: tokens a step, verify ms per token, and the ratio to
plain decoding's ms per token (> 1: lookup would be faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.common import chat_ids
from bench.prompts import CODE_EDITING, MIXED
from specfleet.config import DraftConfig
from specfleet.drafters.ngram import find_continuation
from specfleet.engine import Extend
from specfleet.llamacpp import LlamaCppRunner
from specfleet.models import load_gguf_tokenizer, resolve_gguf

PROMPT_SETS = {"code-edit": CODE_EDITING, "mixed": MIXED}
MEASURED_WIDTHS = (1, 2, 3, 4, 5, 6, 8, 9, 12, 16, 17)


def decode_costs(runner: LlamaCppRunner, context: list[int], repeats: int) -> dict[int, float]:
    """Median ms of one decode of n tokens of one sequence after ``context``, for each n of `MEASURED_WIDTHS`."""
    runner.extend([Extend("cost", 0, context)])
    costs = {}
    for width in MEASURED_WIDTHS:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            runner.extend([Extend("cost", len(context), list(range(100, 100 + width)))])
            times.append(1000 * (time.perf_counter() - began))
        costs[width] = statistics.median(times)
    runner.release(["cost"])
    return costs


def interpolated(costs: dict[int, float], width: int) -> float:
    below = max(w for w in costs if w <= width)
    above = min(w for w in costs if w >= width)
    if below == above:
        return costs[below]
    return costs[below] + (costs[above] - costs[below]) * (width - below) / (above - below)


def greedy(runner: LlamaCppRunner, prompt: list[int], max_new: int, stops: set[int]) -> list[int]:
    """llama.cpp's greedy output, one token a decode (the llamacpp target's reference)."""
    logits = runner.extend([Extend("out", 0, prompt)])
    out = [int(logits[0][-1].argmax())]
    while len(out) < max_new and out[-1] not in stops:
        logits = runner.extend([Extend("out", len(prompt) + len(out) - 1, [out[-1]])])
        out.append(int(logits[0][-1].argmax()))
    runner.release(["out"])
    return out


def replay(prompt: list[int], out: list[int], depth: int, costs: dict[int, float]) -> tuple[int, float]:
    """Steps and verify ms of decoding ``out`` after ``prompt`` with prompt lookup up to ``depth`` drafts a step
    (the suffix lengths of the ngram drafter's defaults); the first token, the prefill's, is left out."""
    steps, ms, position = 0, 0.0, 1
    while position < len(out):
        room = min(depth, len(out) - position - 1)
        drafts = find_continuation(prompt + out[:position], room, DraftConfig.ngram_max, DraftConfig.ngram_min
                                   ) if room else []
        accepted = 0
        for draft, token in zip(drafts, out[position:], strict=False):
            if draft != token:
                break
            accepted += 1
        steps += 1
        ms += interpolated(costs, 1 + len(drafts))
        position += accepted + 1
    return steps, ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a preset or a .gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4, 6, 8, 12, 16])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9, help="decodes timed per width")
    args = parser.parse_args()
    gguf = resolve_gguf(args.model)
    tokenizer = load_gguf_tokenizer(gguf)
    runner = LlamaCppRunner(gguf, num_slots=1, max_seq_len=2048, threads=args.threads, batch_invariant=True)
    sets = {name: [chat_ids(tokenizer, p) for p in prompts] for name, prompts in PROMPT_SETS.items()}
    costs = decode_costs(runner, sets["code-edit"][0], args.repeats)
    print("ms per decode of n tokens: " + ", ".join(f"{n}: {ms:.1f}" for n, ms in costs.items()), flush=True)
    stops = set(runner.eos_token_ids)
    print("| prompts | depth | tokens/step | verify ms/token | vs plain decoding |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, prompts in sets.items():
        outputs = [(prompt, greedy(runner, prompt, args.max_new_tokens, stops)) for prompt in prompts]
        tokens = sum(len(out) - 1 for _, out in outputs)
        for depth in args.depths:
            steps, ms = map(sum, zip(*(replay(p, out, depth, costs) for p, out in outputs), strict=True))
            print(f"| {name} | {depth} | {tokens / steps:.2f} | {ms / tokens:.2f} | "
                  f"{costs[1] * tokens / ms:.2f}x |", flush=True)
    runner.close()


if __name__ == "__main__":
    main()
