"""The CPU attention kernel chosen at load, in whole forwards: for each dtype, the engine's verify-shaped forward
(``batch`` sequences holding ``context`` cached tokens append ``tokens`` new ones, logits at each) with the timed
choice (`specfleet.engine.cpu_attention`), and with each kernel at every width and size: PyTorch's flash kernel,
the batched matmuls, the matmuls per sequence and head, and the C kernel built for this machine (float32, where a
compiler is found). Medians of interleaved repeats; the last column is the
choice's time over the fastest fixed kernel (1.00: the choice found it; above: it did not).

    python -m bench.attention_choice
    python -m bench.attention_choice --dtypes float32 --batches 1 8 16 --contexts 1024 4096 7168

The caches hold random keys and values (a forward's time does not depend on them), as in `bench.engine_vs_hf`, in
slots of ``--max-seq-len`` entries as a service's are, so attention reads a view of each slot's first entries.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time

import torch

from bench.engine_vs_hf import engine_side
from specfleet.engine.cpu_attention import FLASH_ONLY, AttentionKernels, Kernel, always, native_attention_available
from specfleet.engine.runner import load_model, set_cpu_threads
from specfleet.models import resolve_model

RULES = ("timed choice", "flash only", "matmuls only", "head matmuls only", "native only")


def run(args: argparse.Namespace) -> list[str]:
    lines = ["| dtype | context | batch | new tokens | " + " | ".join(f"{rule} ms" for rule in RULES)
             + " | choice / fastest fixed |", "| --- " + "| ---: " * (4 + len(RULES)) + "|"]
    folder = resolve_model(args.model)
    chosen: list[AttentionKernels] = []
    for dtype in args.dtypes:
        model = load_model(folder, dtype=dtype)
        fixed: dict[str, AttentionKernels] = {"flash only": FLASH_ONLY, "matmuls only": always(Kernel.MATMULS),
                                              "head matmuls only": always(Kernel.HEAD_MATMULS)}
        if native_attention_available(model.cfg.head_dim, getattr(torch, dtype)):
            fixed["native only"] = always(Kernel.NATIVE)
        for context in args.contexts:
            for batch in args.batches:
                for tokens in args.tokens:
                    runner, forward = engine_side(model, batch, tokens, context, args.max_seq_len)
                    rules = {"timed choice": runner.attention_kernels, **fixed}
                    if runner.attention_kernels not in chosen:  # the runner timed its slots' shapes
                        chosen.append(runner.attention_kernels)
                        print(f"{dtype}, {batch} slots of {runner.max_seq_len}: {runner.attention_kernels.describe()}",
                              flush=True)
                    times: dict[str, list[float]] = {rule: [] for rule in rules}
                    for round_ in range(args.warmup + args.repeats):
                        for rule in rules:  # the rules take turns, so the machine's slow moments fall on all
                            runner.attention_kernels = rules[rule]
                            started = time.perf_counter()
                            forward()
                            if round_ >= args.warmup:
                                times[rule].append(1000 * (time.perf_counter() - started))
                    ms = {rule: statistics.median(times[rule]) for rule in rules}
                    ratio = ms["timed choice"] / min(ms[rule] for rule in fixed)
                    line = (f"| {dtype} | {context} | {batch} | {tokens} | "
                            + " | ".join(f"{ms[rule]:.1f}" if rule in ms else "-" for rule in RULES)
                            + f" | {ratio:.2f} |")
                    print(line, flush=True)
                    lines.append(line)
                    del runner, forward
                    gc.collect()
        del model
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="preset or model folder (default: %(default)s)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 9, 17], help="new tokens per sequence")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 2048, 7168])
    parser.add_argument("--max-seq-len", type=int, default=8192,
                        help="entries each slot holds, as a service's --max-seq-len (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per rule and cell (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per rule and cell first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: one per core)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_cpu_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    print("\n".join(run(args)))


if __name__ == "__main__":
    main()
