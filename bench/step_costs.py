"""Where a step's time goes: the target's compute, the drafter's compute, and the rest (gRPC hops,
serialisation, router bookkeeping), as the services themselves report it to Redis, at batch 1 or with
``--batch N`` requests at once (the step costs of the samples at batch N).

    python -m bench.step_costs                 # SmolLM2 + ngram, depths 0 and 4, batch 1
    python -m bench.step_costs --depths 0 8 --max-new-tokens 128
    python -m bench.step_costs --batch 32      # 32 requests at once: the router's overhead at batch 32
    python -m bench.step_costs --backend llamacpp --threads 2     # the target on llama.cpp (the preset's GGUF)
    python -m bench.step_costs --lookup target # the target looks the drafts up itself: no draft service
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import Run, chat_ids, fleet, specfleet_generate
from bench.prompts import MIXED
from specfleet.launcher import free_port, wait_redis
from specfleet.models import load_tokenizer, resolve_model
from specfleet.telemetry import TelemetryReader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4, help="batches sent one after another (at batch 1: the "
                        "first N prompts of the mixed set)")
    parser.add_argument("--batch", type=int, default=1, help="requests at once (the prompts cycled; their output "
                        "length fixed, so the batch stays whole)")
    parser.add_argument("--backend", default="engine", choices=["engine", "llamacpp"], help="the target's backend")
    parser.add_argument("--threads", type=int, default=0, help="the target's --threads (0: its default)")
    parser.add_argument("--lookup", default="service", choices=["service", "target"], help="who drafts by prompt "
                        "lookup at depths > 0: an ngram draft service, or the target itself (--prompt-lookup-depth, "
                        "a --self-draft router)")
    args = parser.parse_args()
    spec = "smollm2-135m"
    prompts = [chat_ids(load_tokenizer(resolve_model(spec)), p) for p in MIXED]
    batches = [[prompts[(i * args.batch + j) % len(prompts)] for j in range(args.batch)] for i in range(args.prompts)]
    print(f"batch {args.batch}: client ms/token is each request's, the step costs the medians of the steps at "
          f"batch {args.batch}")
    print("| depth | client ms/token | steps/token | target ms/step | draft ms/step | overhead ms/step |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    with fleet() as f:
        for depth in args.depths:
            port = free_port()  # one Redis per depth keeps the samples apart
            wait_redis(f.deployment.start_redis(port), port)
            redis = ["--redis-url", f"redis://127.0.0.1:{port}/0"]
            in_target = args.lookup == "target" and depth > 0
            lookup = ["--prompt-lookup-depth", str(depth)] if in_target else []
            target = f.start("target", ["--model", spec, "--num-slots", str(max(4, args.batch)), "--backend",
                                        args.backend, "--threads", str(args.threads), *redis, *lookup],
                             f"target-{depth}")
            draft, drafting = None, ["--self-draft"] if in_target else []
            if depth and not in_target:
                draft = f.start("draft", ["--drafter", "ngram", *redis], f"draft-{depth}")
            router = f.router(target, draft, depth, f"router-{depth}", [*redis, *drafting])
            specfleet_generate(router, prompts[0], 8)  # warm-up
            runs = [run for batch in batches for run in generate_at_once(router, batch, args.max_new_tokens)]
            time.sleep(1.0)  # let the writers flush
            view = TelemetryReader(f"redis://127.0.0.1:{port}/0").read()
            ms = {role: statistics.median([s.ms for s in view.samples if s.role == role and s.batch_size == args.batch]
                                          or [0.0]) for role in ("target", "draft", "overhead")}
            tokens = sum(len(r.tokens) for r in runs)
            print(f"| {depth} | {1000 * sum(r.seconds for r in runs) / tokens:.1f} | "
                  f"{sum(r.steps for r in runs) / tokens:.2f} | {ms['target']:.1f} | {ms['draft']:.1f} | "
                  f"{ms['overhead']:.1f} |", flush=True)


def generate_at_once(router: str, prompts: list[list[int]], max_new_tokens: int) -> list[Run]:
    """The prompts as concurrent requests; several run to exactly ``max_new_tokens`` tokens (one stopping early
    would shrink the batch), one alone stops at its end of turn as a user's would."""
    if len(prompts) == 1:
        return [specfleet_generate(router, prompts[0], max_new_tokens)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda ids: specfleet_generate(router, ids, max_new_tokens, ignore_eos=True), prompts))


if __name__ == "__main__":
    main()
