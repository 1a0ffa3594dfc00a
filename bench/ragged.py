"""What one Verify-shaped forward costs for uniform and ragged batches of the same number of tokens.

SmolLM2-135M on the engine alone (no services): 32 sequences holding a 300-token context each extend by
1, 2 or 3 tokens (uniform), or by a mix that adds up to 2 tokens per sequence (ragged: some sequences
drafted, others not); plus one prompt prefilled next to a one-token decode. The policy's cost model
assumes a forward costs what its tokens cost, whatever their spread: the ragged rows should match the
uniform row with as many tokens.

    python -m bench.ragged
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from specfleet.engine import ModelRunner
from specfleet.engine.runner import Extend
from specfleet.models import resolve_model

CASES = {
    "32 x 1": [1] * 32,
    "32 x 2": [2] * 32,
    "32 x 3": [3] * 32,
    "28 x 1 + 4 x 9": [1] * 28 + [9] * 4,
    "24 x 1 + 8 x 5": [1] * 24 + [5] * 8,
    "16 x 1 + 16 x 3": [1] * 16 + [3] * 16,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=300, help="tokens each sequence already holds")
    parser.add_argument("--repeats", type=int, default=11, help="each cell is the median of this many forwards")
    args = parser.parse_args()

    runner = ModelRunner.from_folder(resolve_model("smollm2-135m"), num_slots=40, max_seq_len=1024)
    runner.warm_up()
    rng = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, runner.vocab_size, (n,), generator=rng).tolist()

    ids = [f"s{i}" for i in range(32)]
    runner.extend([Extend(i, 0, tokens(args.context)) for i in ids])

    def median_ms(make) -> float:
        times = []
        for _ in range(args.repeats):
            requests = make()
            start = time.perf_counter()
            runner.extend(requests)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    print("| batch shape (new tokens per sequence) | tokens | ms per forward |")
    print("| --- | ---: | ---: |")
    for name, widths in CASES.items():
        ms = median_ms(lambda widths=widths: [Extend(i, args.context, tokens(w), num_logits=w)
                                               for i, w in zip(ids, widths, strict=True)])
        print(f"| {name} | {sum(widths)} | {ms:.1f} |", flush=True)
    prompts = (f"p{n}" for n in itertools.count())
    previous: list[str] = []

    def prefill_next_to_decode() -> list[Extend]:
        runner.release(previous)  # the last repeat's prompt: slots stay free
        previous[:] = [next(prompts)]
        return [Extend(ids[0], args.context, tokens(1)), Extend(previous[0], 0, tokens(args.context))]

    ms = median_ms(prefill_next_to_decode)
    print(f"| 1 x 1 + a {args.context}-token prefill | {args.context + 1} | {ms:.1f} |")


if __name__ == "__main__":
    main()
