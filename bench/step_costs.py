"""Where a step's time goes: the target's compute, the drafter's compute, and the rest (gRPC hops,
serialisation, router bookkeeping), as the services themselves report it to Redis, at batch 1 or with
``--batch N`` requests at once (the step costs of the samples at batch N).

    python -m bench.step_costs                 # SmolLM2 + ngram, depths 0 and 4, batch 1
    python -m bench.step_costs --depths 0 8 --max-new-tokens 128
    python -m bench.step_costs --batch 32      # 32 requests at once: the router's overhead at batch 32
    python -m bench.step_costs --backend llamacpp --threads 2     # the target on llama.cpp (the preset's GGUF)
    python -m bench.step_costs --lookup target # the target looks the drafts up itself: no draft service
    python -m bench.step_costs --drafter sparse_self --context 4096 --batch 8 --depths 0 2 --prompts 1
                                               # the target's own weights drafting over long prompts (MagicDec)

With ``--context N`` the prompts are long standard-library modules cut to exactly N tokens, as `bench.long_context`
cuts them; each batch is sent once for 4 tokens before it is timed, so that the target and the draft hold its prompts
(the step costs are medians over every step at the full batch, those few included).
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import Run, chat_ids, fleet, specfleet_generate
from bench.long_context import MODEL_CONTEXT, SPARSE_SINKS, SPARSE_WINDOW, summarise_code_prompts
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
    parser.add_argument("--drafter", default="ngram", choices=["ngram", "sparse_self"], help="the draft service's "
                        "drafter at depths > 0 (sparse_self: the target's weights over 16 sinks + a 240-token window)")
    parser.add_argument("--sparse-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--context", type=int, default=0, help="long prompts of exactly this many tokens (0: the "
                        "mixed set's short ones)")
    args = parser.parse_args()
    if args.drafter != "ngram" and args.lookup == "target":
        parser.error("--lookup target drafts by prompt lookup in the target: it takes no --drafter")
    spec = "smollm2-135m"
    tokenizer = load_tokenizer(resolve_model(spec))
    prompts = (summarise_code_prompts(tokenizer, args.context, args.batch * args.prompts) if args.context
               else [chat_ids(tokenizer, p) for p in MIXED])
    # Long prompts: room for them, and kept by the target and the draft for the timed run after the first.
    long_context = ["--max-seq-len", str(MODEL_CONTEXT), "--prefix-reuse", "on"] if args.context else []
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
            # Two slots spare: a sequence starting from a prompt another slot holds copies it into a free one.
            slots = ["--num-slots", str(max(4, args.batch + 2 if args.context else args.batch)), *long_context]
            target = f.start("target", ["--model", spec, *slots, "--backend", args.backend, "--threads",
                                        str(args.threads), *redis, *lookup], f"target-{depth}")
            draft, drafting = None, ["--self-draft"] if in_target else []
            if depth and not in_target:
                drafter = (["--drafter", "sparse_self", "--model", spec, "--sparse-sinks", str(SPARSE_SINKS),
                            "--sparse-window", str(SPARSE_WINDOW), "--dtype", args.sparse_dtype, *slots]
                           if args.drafter == "sparse_self" else ["--drafter", "ngram"])
                draft = f.start("draft", [*drafter, *redis], f"draft-{depth}")
            router = f.router(target, draft, depth, f"router-{depth}", [*redis, *drafting])
            specfleet_generate(router, prompts[0][:64], 8)  # warm-up
            runs = []
            for batch in batches:
                if args.context:  # the prompts computed first (and caught up by a draft), so the timed steps decode
                    generate_at_once(router, batch, 4)
                runs += generate_at_once(router, batch, args.max_new_tokens)
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
