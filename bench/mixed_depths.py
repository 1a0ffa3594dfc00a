"""What a verification with mixed per-sequence depths costs, against what the depth policy prices it at.

SmolLM2-135M's Verifier in process (no services): B sequences holding a 150-token context each verify one
committed token plus d_i draft tokens. Uniform plans (every d_i equal) give the cost curve by tokens; each
mixed plan is then priced three ways off that curve: at its real tokens, at its tokens padded to its widest
row, and as the policy does (real plus `PADDING_SHARE` of the padding). `share` is where the measured time
falls between real (0) and fully padded (1): the policy's constant should sit at the upper end of it.

    python -m bench.mixed_depths
    python -m bench.mixed_depths --batches 8 --repeats 11
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from specfleet.engine import ModelRunner
from specfleet.engine.runner import Extend
from specfleet.models import resolve_model
from specfleet.policy import PADDING_SHARE, verified_drafts
from specfleet.sampling_params import SamplingParams
from target_service.verifier import Verifier, VerifyItem

CONTEXT = 150
MAX_DEPTH = 8


def _plans(batch: int, seed: int) -> dict[str, list[int]]:
    """Named depth plans: every uniform depth, a few spreads seen from the policy, and random mixes."""
    rng = random.Random(seed)
    half = batch // 2
    plans = {f"all {d}": [d] * batch for d in range(MAX_DEPTH + 1)}
    plans[f"{half} x 0 + {batch - half} x 6"] = [0] * half + [6] * (batch - half)
    plans["0-3 spread"] = [i * 4 // batch for i in range(batch)]
    plans["0-8 spread"] = [i * 9 // batch for i in range(batch)]
    plans["2-5 spread"] = [2 + i * 4 // batch for i in range(batch)]
    for k in range(4):
        plans[f"random {k}"] = [rng.choice([0, 0, 1, 2, 3, 5, 8]) for _ in range(batch)]
    return plans


def _on_curve(uniform_ms: list[float], depth: float) -> float:
    """The uniform plans' cost at a fractional depth, linear between whole depths."""
    low = min(int(depth), len(uniform_ms) - 2)
    return uniform_ms[low] + (depth - low) * (uniform_ms[low + 1] - uniform_ms[low])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=7, help="each cell is the median of this many verifications")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runner = ModelRunner.from_folder(resolve_model("smollm2-135m"), num_slots=max(args.batches),
                                     max_seq_len=CONTEXT + MAX_DEPTH + 8)
    runner.warm_up()
    verifier = Verifier(runner)
    greedy = SamplingParams()
    for i in range(max(args.batches)):
        runner.extend([Extend(f"s{i}", 0, [5] * CONTEXT)])

    def verify_ms(depths: list[int]) -> float:
        items = [VerifyItem(f"s{i}", CONTEXT, [7], [9] * d, None, greedy) for i, d in enumerate(depths)]
        start = time.perf_counter()
        verifier.verify(items)
        return (time.perf_counter() - start) * 1000

    print(f"PADDING_SHARE = {PADDING_SHARE}")
    print("| batch | plan | drafts | padded to widest | ms | at real | at padded | priced | share |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch in args.batches:
        plans = _plans(batch, seed=batch)
        times: dict[str, list[float]] = {name: [] for name in plans}
        for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits every plan alike
            for name, depths in plans.items():
                times[name].append(verify_ms(depths))
        ms = {name: statistics.median(t) for name, t in times.items()}
        uniform = [ms[f"all {d}"] for d in range(MAX_DEPTH + 1)]

        for name, depths in plans.items():
            drafts, padded = sum(depths), max(depths) * batch
            real, full, priced = (_on_curve(uniform, d / batch) for d in (drafts, padded,
                                                                         verified_drafts(drafts, padded)))
            share = f"{(ms[name] - real) / (full - real):.2f}" if padded > drafts else ""
            print(f"| {batch} | {name} | {drafts} | {padded} | {ms[name]:.1f} | {real:.1f} | {full:.1f} | "
                  f"{priced:.1f} | {share} |")


if __name__ == "__main__":
    main()
