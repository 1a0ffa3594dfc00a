"""Where a step's time goes at batch 1: the target's compute, the drafter's compute, and the rest
(gRPC hops, serialisation, router bookkeeping), as the services themselves report it to Redis.

    python -m bench.step_costs                 # SmolLM2 + ngram, depths 0 and 4
    python -m bench.step_costs --depths 0 8 --max-new-tokens 128
    python -m bench.step_costs --backend llamacpp --threads 2     # the target on llama.cpp (the preset's GGUF)
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.common import chat_ids, fleet, specfleet_generate
from bench.prompts import MIXED
from specfleet.launcher import free_port, wait_redis
from specfleet.models import load_tokenizer, resolve_model
from specfleet.telemetry import TelemetryReader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--backend", default="engine", choices=["engine", "llamacpp"], help="the target's backend")
    parser.add_argument("--threads", type=int, default=0, help="the target's --threads (0: its default)")
    args = parser.parse_args()
    spec = "smollm2-135m"
    prompts = [chat_ids(load_tokenizer(resolve_model(spec)), p) for p in MIXED[: args.prompts]]
    print("| depth | client ms/token | steps/token | target ms/step | draft ms/step | overhead ms/step |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    with fleet() as f:
        for depth in args.depths:
            port = free_port()  # one Redis per depth keeps the samples apart
            wait_redis(f.deployment.start_redis(port), port)
            redis = ["--redis-url", f"redis://127.0.0.1:{port}/0"]
            target = f.start("target", ["--model", spec, "--num-slots", "4", "--backend", args.backend,
                                        "--threads", str(args.threads), *redis], f"target-{depth}")
            draft = f.start("draft", ["--drafter", "ngram", *redis], f"draft-{depth}") if depth else None
            router = f.router(target, draft, depth, f"router-{depth}", redis)
            specfleet_generate(router, prompts[0], 8)  # warm-up
            runs = [specfleet_generate(router, ids, args.max_new_tokens) for ids in prompts]
            time.sleep(1.0)  # let the writers flush
            view = TelemetryReader(f"redis://127.0.0.1:{port}/0").read()
            ms = {role: statistics.median([s.ms for s in view.samples if s.role == role and s.batch_size == 1]
                                          or [0.0]) for role in ("target", "draft", "overhead")}
            tokens = sum(len(r.tokens) for r in runs)
            print(f"| {depth} | {1000 * sum(r.seconds for r in runs) / tokens:.1f} | "
                  f"{sum(r.steps for r in runs) / tokens:.2f} | {ms['target']:.1f} | {ms['draft']:.1f} | "
                  f"{ms['overhead']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
