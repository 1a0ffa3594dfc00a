"""Prompts computed by the drafter while the target computes them (`--prefill-alongside`): time to first token and
tokens/s against the default (the first step waits for the draft's prefill, then the target's).

SmolLM2-135M target in specfleet's engine, the same model's Q4_1 GGUF drafting in llama.cpp (`--drafter
llamacpp`), at depth 3 with and without drafting ahead, beside depth 0. Prompts: the first tokens of Python
standard-library sources (long documents, so prefill matters), each sent through every configuration in turn
(interleaved), greedy; every row must be token-identical to depth 0 (the run stops if not). With ``--pinned`` the
draft runs on core 0 and the target on core 1 (``taskset``, one thread each), standing in for a CPU draft beside a
GPU target; without it the two share every core.

    python -m bench.prefill_alongside --pinned                          # 8 prompts of 300 tokens, 64 new tokens
    python -m bench.prefill_alongside --prompt-tokens 1000 --max-new-tokens 32 --pinned
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.common import fleet
from bench.duo import Timed, _start, _stream_timed
from specfleet.models import load_tokenizer, resolve_model

MODEL = "smollm2-135m"
SOURCES = ["textwrap", "difflib", "json/__init__", "inspect", "statistics", "argparse", "typing", "dataclasses"]


def prompts(count: int, tokens: int) -> list[list[int]]:
    """The first ``tokens`` tokens of ``count`` standard-library modules' sources."""
    tokenizer = load_tokenizer(resolve_model(MODEL))
    library = Path(statistics.__file__).parent
    texts = [(library / f"{name}.py").read_text() for name in SOURCES[:count]]
    return [tokenizer.encode(text, add_special_tokens=False)[:tokens] for text in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, choices=range(1, len(SOURCES) + 1), metavar="N",
                        help=f"prompts (at most {len(SOURCES)})")
    parser.add_argument("--prompt-tokens", type=int, default=300, help="tokens per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--pinned", action="store_true", help="draft on core 0, target on core 1 (taskset)")
    args = parser.parse_args()
    ids = prompts(args.prompts, args.prompt_tokens)
    with fleet() as f:
        redis = ["--redis-url", f.redis()]
        slots = ["--num-slots", "4", "--max-seq-len", "2048"]
        target = _start(f, "target", ["--model", MODEL, *slots, *redis], "target", "1" if args.pinned else None)
        draft = _start(f, "draft", ["--drafter", "llamacpp", "--model", MODEL, *slots, *redis, "--threads",
                                    "1" if args.pinned else "2"], "draft", "0" if args.pinned else None)
        routers = {"depth 0": f.router(target, None, 0, "router-0", redis)}
        for ahead in ([], ["--draft-ahead"]):
            for alongside in ([], ["--prefill-alongside"]):
                name = f"llamacpp {'ahead ' if ahead else ''}d3{' alongside' if alongside else ''}"
                routers[name] = f.router(target, draft, 3, name.replace(" ", "-"), [*redis, *ahead, *alongside])
        for address in routers.values():  # warm-up: connections, the policy's start
            _stream_timed(address, ids[0][:50], 4, 0.0, 0)
        runs: dict[str, list[Timed]] = {name: [] for name in routers}
        for prompt in ids:
            for name, address in routers.items():
                runs[name].append(_stream_timed(address, prompt, args.max_new_tokens, 0.0, 0))
    plain = [run.tokens for run in runs["depth 0"]]
    for name, timed in runs.items():
        if [run.tokens for run in timed] != plain:
            raise AssertionError(f"{name} is not token-identical to depth 0")
    print(f"\n{len(ids)} prompts of {args.prompt_tokens} tokens, {args.max_new_tokens} new tokens, greedy, "
          f"{'pinned (draft core 0, target core 1)' if args.pinned else 'unpinned'}; every row token-identical to "
          "depth 0\n")
    print("| configuration | TTFT ms (median) | tokens/s | vs depth 0 |")
    print("| --- | ---: | ---: | ---: |")
    base = _rate(runs["depth 0"])
    for name, timed in runs.items():
        ttft = 1000 * statistics.median(run.first_s for run in timed)
        print(f"| {name} | {ttft:.0f} | {_rate(timed):.2f} | {_rate(timed) / base:.2f}x |")


def _rate(runs: list[Timed]) -> float:
    """Tokens per second, each request counted from its call to its last token."""
    return sum(len(run.tokens) for run in runs) / sum(run.total_s for run in runs)


if __name__ == "__main__":
    main()
