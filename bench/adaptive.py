"""Goodput against batch size for fixed speculation depths and for the adaptive policy.

SmolLM2-135M target, ``ngram`` drafter, greedy, a fixed mixed prompt set (code edits and open
questions). For each batch size B, B closed-loop clients keep B requests in flight through one router;
goodput is the number of tokens streamed back during a measurement window, divided by its length.
Every policy runs against the same target and draft services and shares one Redis, so ``auto`` sees
the fleet's measured costs and acceptance as it would in production.

    python -m bench.adaptive                       # the full table and bench/results/adaptive.png
    python -m bench.adaptive --batch-sizes 1 8 --window-s 5   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import grpc

from bench.common import chat_ids, fleet
from bench.prompts import MIXED
from specfleet.models import load_tokenizer, resolve_model
from specfleet.protos import generate_pb2, generate_pb2_grpc

DEPTHS = [0, 1, 2, 3, 4, 6, 8]
RESULTS = Path(__file__).parent / "results"


def goodput(address: str, prompts: list[list[int]], batch: int, warmup_s: float, window_s: float,
            max_new_tokens: int) -> float:
    """Tokens per second streamed to ``batch`` closed-loop clients during the window after warm-up."""
    start = time.monotonic() + warmup_s
    end = start + window_s
    counted = [0] * batch
    stop = threading.Event()

    def client(index: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = generate_pb2_grpc.GenerationServiceStub(channel)
            n = index
            while not stop.is_set():
                request = generate_pb2.GenerateRequest()
                request.token_ids.ids.extend(prompts[n % len(prompts)])
                request.stopping.max_new_tokens = max_new_tokens
                n += batch
                call = stub.GenerateStream(request, timeout=600)
                try:
                    for message in call:
                        now = time.monotonic()
                        if start <= now < end:
                            counted[index] += len(message.token_ids)
                        if stop.is_set():
                            call.cancel()
                            break
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.CANCELLED:
                        raise

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(batch)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, end - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(timeout=120)
    return sum(counted) / window_s


def table(results: dict[int, dict[str, float]], policies: list[str]) -> str:
    fixed = [p for p in policies if p != "auto"]
    lines = ["| batch | " + " | ".join(f"depth {p}" for p in fixed) + " | auto | auto / best fixed |",
             "| ---: | " + " | ".join("---:" for _ in fixed) + " | ---: | ---: |"]
    for batch, row in results.items():
        best = max(fixed, key=lambda p: row[p])
        cells = [f"**{row[p]:.1f}**" if p == best else f"{row[p]:.1f}" for p in fixed]
        lines.append(f"| {batch} | " + " | ".join(cells) + f" | {row['auto']:.1f} | {row['auto'] / row[best]:.2f} |")
    means = {p: statistics.mean(row[p] for row in results.values()) for p in policies}
    lines.append("| mean | " + " | ".join(f"{means[p]:.1f}" for p in fixed) + f" | {means['auto']:.1f} | "
                 f"{means['auto'] / max(means[p] for p in fixed):.2f} |")
    return "\n".join(lines)


def plot(results: dict[int, dict[str, float]], policies: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in policies:
        style = dict(linewidth=2.5, color="black") if p == "auto" else dict(linewidth=1, alpha=0.8)
        ax.plot(batches, [results[b][p] for b in batches], marker="o", label=p if p == "auto" else f"depth {p}",
                **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (requests in flight)")
    ax.set_ylabel("goodput (generated tokens/s)")
    ax.set_title("SmolLM2-135M + ngram drafter: fixed depths vs auto")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--depths", type=int, nargs="+", default=DEPTHS)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--plot", type=Path, default=RESULTS / "adaptive.png")
    args = parser.parse_args()

    spec = "smollm2-135m"
    prompts = [chat_ids(load_tokenizer(resolve_model(spec)), p) for p in MIXED]
    policies = [str(d) for d in args.depths] + ["auto"]
    results: dict[int, dict[str, float]] = {}
    with fleet() as f:
        redis = ["--redis-url", f.redis()]
        slots = ["--num-slots", str(max(args.batch_sizes) + 4), "--max-seq-len", "1024"]
        target = f.start("target", ["--model", spec, *slots, *redis], "target")
        draft = f.start("draft", ["--drafter", "ngram", *redis], "draft")
        routers = {p: f.router(target, draft if p != "0" else None, p, f"router-{p}",
                               [*redis, "--max-queue", "4096"]) for p in policies}
        for batch in args.batch_sizes:
            results[batch] = {}
            for p in policies:
                results[batch][p] = goodput(routers[p], prompts, batch, args.warmup_s, args.window_s,
                                            args.max_new_tokens)
                print(f"  batch {batch:3d}  {'depth ' + p if p != 'auto' else 'auto':>8}: "
                      f"{results[batch][p]:7.1f} tokens/s", flush=True)
    print()
    print(f"Goodput (generated tokens/s), SmolLM2-135M target, ngram drafter, greedy, {args.max_new_tokens} new "
          f"tokens per request, {args.window_s:.0f} s window after {args.warmup_s:.0f} s warm-up; best fixed depth "
          "in bold")
    print()
    print(table(results, policies))
    plot(results, policies, args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
