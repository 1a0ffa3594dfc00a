"""End-to-end speed at batch 1: transformers' generate against specfleet's three services.

Table 1, SmolLM2-135M target on this machine: HF plain, HF prompt lookup, specfleet depth 0 and the
``ngram`` drafter at depths 2/4/8 and ``auto``, and the same prompt lookup done by the target itself
(``--prompt-lookup-depth``, a ``--self-draft`` router) at depths 4/8 and ``auto``, over code-editing tasks and open
questions (greedy, 128 tokens).
Table 2, the real pair: Qwen2.5-Coder-1.5B target with the 0.5B drafting, on HumanEval prompts
(greedy, 64 tokens): HF plain, HF assisted generation, specfleet depth 0 and the ``model`` drafter
at depths 2/4/6.

    python -m bench.e2e                 # both tables
    python -m bench.e2e --part smollm2  # or: --part pair

Every specfleet configuration must produce exactly the tokens of specfleet at depth 0 (plain
decoding by the same target): the run stops if not.
"""

from __future__ import annotations

import argparse
import gc
from functools import partial

import torch

from bench.common import Tally, chat_ids, fleet, hf_generate, run_rounds, specfleet_generate, table
from bench.prompts import MIXED, humaneval_prompts
from specfleet.models import load_tokenizer, resolve_model


def _hf_model(spec: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype=torch.float32).eval()


def _report_hf_agreement(tallies: dict[str, Tally], hf: str, ours: str) -> str:
    pairs = zip(tallies[hf].rounds[-1], tallies[ours].rounds[-1], strict=True)
    same = sum(a.tokens == b.tokens for a, b in pairs)
    return f"{same}/{len(tallies[hf].rounds[-1])} prompts token-identical between {hf!r} and {ours!r}"


def smollm2(args: argparse.Namespace) -> str:
    spec = "smollm2-135m"
    tokenizer = load_tokenizer(resolve_model(spec))
    prompts = [chat_ids(tokenizer, p) for p in MIXED]
    model = _hf_model(spec)
    max_new = args.max_new_tokens or 128
    with fleet() as f:
        # Redis carries the services' latencies to the `auto` router, as in a deployment.
        redis = ["--redis-url", f.redis()]
        slots = ["--num-slots", "8", "--max-seq-len", "2048"]
        # The target also looks drafts up itself (--prompt-lookup-depth) for the routers that ask it (--self-draft).
        target = f.start("target", ["--model", spec, *slots, *redis, "--prompt-lookup-depth", "8"], "target")
        draft = f.start("draft", ["--drafter", "ngram", *redis], "draft")
        routers = {d: f.router(target, draft if d else None, d, f"router-{d}", redis) for d in (0, 2, 4, 8, "auto")}
        lookup = {d: f.router(target, None, d, f"router-lookup-{d}", [*redis, "--self-draft"]) for d in (4, 8, "auto")}
        configs = {
            "HF generate": partial(hf_generate, model, max_new_tokens=max_new),
            f"HF prompt lookup ({args.lookup})": partial(hf_generate, model, max_new_tokens=max_new,
                                                        prompt_lookup_num_tokens=args.lookup),
            "specfleet depth 0": lambda ids: specfleet_generate(routers[0], ids, max_new),
            **{f"specfleet ngram depth {d}": partial(lambda ids, d: specfleet_generate(routers[d], ids, max_new), d=d)
               for d in (2, 4, 8)},
            "specfleet ngram auto": lambda ids: specfleet_generate(routers["auto"], ids, max_new),
            **{f"specfleet lookup in target {d}": partial(
                lambda ids, d: specfleet_generate(lookup[d], ids, max_new), d=d) for d in lookup},
        }
        run_rounds(configs, prompts[:1], 1)  # warm-up: first calls pay one-time costs
        tallies = run_rounds(configs, prompts, args.rounds, check_equal_to="specfleet depth 0")
    title = (f"SmolLM2-135M, batch 1, greedy, {max_new} new tokens, {len(prompts)} prompts "
             f"(5 code edits, 5 open questions), median of {args.rounds} rounds")
    return table(title, tallies, "HF generate") + "\n\n" + _report_hf_agreement(tallies, "HF generate",
                                                                               "specfleet depth 0")


def pair(args: argparse.Namespace) -> str:
    target_spec, draft_spec = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
    tokenizer = load_tokenizer(resolve_model(target_spec))
    prompts = [chat_ids(tokenizer, p) for p in humaneval_prompts(6)]
    max_new = args.max_new_tokens or 64
    # transformers first, then specfleet: both pairs of models at once would not fit in memory here.
    target, assistant = _hf_model(target_spec), _hf_model(draft_spec)
    hf_configs = {
        "HF generate": partial(hf_generate, target, max_new_tokens=max_new),
        "HF assisted (0.5B)": partial(hf_generate, target, max_new_tokens=max_new, assistant_model=assistant),
    }
    run_rounds(hf_configs, prompts[:1], 1)
    tallies = run_rounds(hf_configs, prompts, args.rounds)
    del target, assistant
    gc.collect()
    with fleet() as f:
        slots = ["--num-slots", "4", "--max-seq-len", "2048"]
        target_address = f.start("target", ["--model", target_spec, *slots], "target")
        # The drafter keeps its packed weights as a service does by default: without them its one-token forwards took
        # 1.8x as long (bench/e2e.md, 2026-12-06).
        draft_address = f.start("draft", ["--drafter", "model", "--model", draft_spec, *slots], "draft")
        routers = {d: f.router(target_address, draft_address if d else None, d, f"router-{d}") for d in (0, 2, 4, 6)}
        ours = {
            "specfleet depth 0": lambda ids: specfleet_generate(routers[0], ids, max_new),
            **{f"specfleet model depth {d}": partial(lambda ids, d: specfleet_generate(routers[d], ids, max_new), d=d)
               for d in (2, 4, 6)},
        }
        run_rounds(ours, prompts[:1], 1)
        tallies |= run_rounds(ours, prompts, args.rounds, check_equal_to="specfleet depth 0")
    title = (f"Qwen2.5-Coder-1.5B target, 0.5B draft, batch 1, greedy, {max_new} new tokens, "
             f"{len(prompts)} HumanEval prompts, median of {args.rounds} round(s)")
    return table(title, tallies, "HF generate") + "\n\n" + _report_hf_agreement(tallies, "HF generate",
                                                                               "specfleet depth 0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["smollm2", "pair", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over the prompts (default: 3 / 1)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 128 / 64")
    parser.add_argument("--lookup", type=int, default=10, help="HF prompt_lookup_num_tokens")
    args = parser.parse_args()
    results = []
    if args.part in ("smollm2", "both"):
        results.append(smollm2(argparse.Namespace(**{**vars(args), "rounds": args.rounds or 3})))
        print("\n" + results[-1] + "\n", flush=True)
    if args.part in ("pair", "both"):
        results.append(pair(argparse.Namespace(**{**vars(args), "rounds": args.rounds or 1})))
        print("\n" + results[-1] + "\n", flush=True)
    print("\n\n".join(results))


if __name__ == "__main__":
    main()
