"""Draft trees against chains: mean accepted tokens per step and tokens/s.

As in the RSD paper (Jeon et al. 2024), at a fixed number of draft tokens per path (tree depth) and
at a fixed target compute budget (nodes per verify): a chain, RSD-C, RSD-S and independent sampling
with replacement (SpecInfer-style, ``iid``), run by the same drafter and verifier code the services
run (``ModelDrafter``/``NgramDrafter`` -> ``Verifier``, sessions and rollback included), in process so
that gRPC does not blur the comparison.

    python -m bench.trees --part pair     # qwen2.5-coder-0.5b drafting for qwen2.5-coder-1.5b, HumanEval
    python -m bench.trees --part ngram    # SmolLM2-135M with the ngram drafter at batch 16
    python -m bench.trees --part pair --batches 1 --temperatures 1 --prompts 3   # a reduced run

Greedy rows must equal plain greedy decoding (the run stops if not); sampled rows use one seed per
prompt.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from bench.common import chat_ids
from bench.prompts import MIXED, humaneval_prompts, sharegpt_prompts
from specfleet.drafters import DraftRequest, NgramDrafter
from specfleet.drafters.model import ModelDrafter
from specfleet.engine import ModelRunner
from specfleet.models import load_tokenizer, resolve_model
from specfleet.sampling_params import SamplingParams
from specfleet.trees.shapes import ROOT_PARENT, TreeShape, chain_shape
from target_service.verifier import Verifier, VerifyItem

# (setting, method, shape): at equal depth the trees spend more nodes; at equal nodes they are shallower, so
# each budget tries several shapes per method (as the RSD paper does: the best shape per method counts).
EQUAL_DEPTH = [("depth 3", "chain", chain_shape(3)), ("depth 3", "rsd-c", TreeShape("rsd-c", (2, 2, 1))),
               ("depth 3", "rsd-s", TreeShape("rsd-s", beam_width=3, depth=3)),
               ("depth 3", "iid", TreeShape("iid", (2, 2, 1)))]
EQUAL_NODES = [("6 nodes", "chain", chain_shape(6)),
               ("6 nodes", "rsd-c", TreeShape("rsd-c", (2, 2))), ("6 nodes", "rsd-c", TreeShape("rsd-c", (2, 1, 1))),
               ("6 nodes", "rsd-s", TreeShape("rsd-s", beam_width=2, depth=3)),
               ("6 nodes", "iid", TreeShape("iid", (2, 2))), ("6 nodes", "iid", TreeShape("iid", (2, 1, 1)))]
EQUAL_NODES_12 = [("12 nodes", "chain", chain_shape(12)),
                  ("12 nodes", "rsd-c", TreeShape("rsd-c", (3, 3))),
                  ("12 nodes", "rsd-c", TreeShape("rsd-c", (2, 1, 1, 1, 1, 1))),
                  ("12 nodes", "rsd-s", TreeShape("rsd-s", beam_width=2, depth=6)),
                  ("12 nodes", "rsd-s", TreeShape("rsd-s", beam_width=3, depth=4)),
                  ("12 nodes", "iid", TreeShape("iid", (3, 3))),
                  ("12 nodes", "iid", TreeShape("iid", (2, 1, 1, 1, 1, 1)))]
SETTINGS = {"6": EQUAL_NODES, "12": EQUAL_NODES_12, "depth3": EQUAL_DEPTH}


@dataclass
class Outcome:
    tokens: list[list[int]]
    steps: int
    accepted: int
    seconds: float
    walks: list[tuple[list[int], list[int]]]  # per step: every draft node's parent, the accepted path's nodes


def decode(drafter, verifier: Verifier, prompts: list[list[int]], shape: TreeShape | None, sampling: SamplingParams,
           max_new: int, tag: str) -> Outcome:
    """Every prompt in flight at once, step by step as the router runs them (propose -> verify -> commit)."""
    names = [f"{tag}-{i}" for i in range(len(prompts))]
    tokens = {n: list(p) for n, p in zip(names, prompts, strict=True)}
    target = {n: len(p) + max_new for n, p in zip(names, prompts, strict=True)}
    draft_cached, target_cached = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    steps = accepted = 0
    walks: list[tuple[list[int], list[int]]] = []
    started = time.perf_counter()
    while live := [n for n in names if len(tokens[n]) < target[n]]:
        tree = None if shape is None or shape.is_chain else shape
        depth = 0 if shape is None else shape.levels
        proposals = drafter.propose([DraftRequest(n, draft_cached[n], tokens[n][draft_cached[n]:], depth, sampling,
                                                  seed=i, tree=tree) for i, n in enumerate(live)])
        verdicts = verifier.verify([VerifyItem(n, target_cached[n], tokens[n][target_cached[n]:], p.tokens,
                                               p.draft_top_k, sampling, i, p.parents)
                                    for i, (n, p) in enumerate(zip(live, proposals, strict=True))])
        for n, p, v in zip(live, proposals, verdicts, strict=True):
            draft_cached[n] = min(p.cached_len, len(tokens[n]) + v.accepted)
            target_cached[n] = v.cached_len
            tokens[n] += list(v.tokens)
            steps += 1
            accepted += v.accepted
            if p.parents is None:  # a chain: node j's parent is node j - 1, the first node's the root
                parents = [j - 1 if j else ROOT_PARENT for j in range(len(p.tokens))]
                walks.append((parents, list(range(v.accepted))))
            else:
                walks.append((list(p.parents), list(v.accepted_nodes)))
    seconds = time.perf_counter() - started
    drafter.release(names)
    verifier.runner.release(names)
    return Outcome([tokens[n][len(p):][:max_new] for n, p in zip(names, prompts, strict=True)], steps, accepted,
                   seconds, walks)


def run_table(title: str, drafter, verifier: Verifier, prompts: list[list[int]], batches: list[int],
              temperatures: list[float], max_new: int, configs) -> str:
    lines = [f"### {title}", "", "| batch | temperature | setting | method | shape | nodes | accepted tokens/step "
             "| tokens/s |", "| ---: | ---: | --- | --- | --- | ---: | ---: | ---: |"]
    for batch in batches:
        for temperature in temperatures:
            sampling = SamplingParams(temperature=temperature)
            groups = [prompts[i: i + batch] for i in range(0, len(prompts), batch)]
            plain = None
            if temperature == 0:
                plain = [decode(drafter, verifier, g, None, sampling, max_new, "plain").tokens for g in groups]
            for setting, method, shape in configs:
                outs = [decode(drafter, verifier, g, shape, sampling, max_new, f"{method}") for g in groups]
                if plain is not None and [o.tokens for o in outs] != plain:
                    raise AssertionError(f"{method} ({setting}, batch {batch}) differs from plain greedy decoding")
                steps, accepted = sum(o.steps for o in outs), sum(o.accepted for o in outs)
                rate = sum(len(t) for o in outs for t in o.tokens) / sum(o.seconds for o in outs)
                form = f"{shape.levels} deep" if shape.is_chain else shape.describe().split(" ", 1)[1]
                lines.append(f"| {batch} | {temperature:g} | {setting} | {method} | {form} | {shape.nodes} | "
                             f"{accepted / steps:.2f} | {rate:.1f} |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


def pair_part(args: argparse.Namespace) -> str:
    target_dir, draft_dir = resolve_model("qwen2.5-coder-1.5b"), resolve_model("qwen2.5-coder-0.5b")
    tokenizer = load_tokenizer(target_dir)
    texts = humaneval_prompts(args.prompts) if args.prompt_set == "humaneval" else sharegpt_prompts(args.prompts)
    prompts = [chat_ids(tokenizer, t) for t in texts]
    slots = max(args.batches) * 2
    drafter = ModelDrafter(ModelRunner.from_folder(draft_dir, num_slots=slots, max_seq_len=1024))
    verifier = Verifier(ModelRunner.from_folder(target_dir, num_slots=slots, max_seq_len=1024))
    configs = [c for name in args.settings for c in SETTINGS[name]]
    return run_table(f"qwen2.5-coder-0.5b drafting for qwen2.5-coder-1.5b ({args.prompt_set})", drafter, verifier,
                     prompts, args.batches, args.temperatures, args.max_new, configs)


def ngram_part(args: argparse.Namespace) -> str:
    target_dir = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(target_dir)
    texts = (MIXED * 16)[:16]
    prompts = [tokenizer.encode(t) for t in texts]
    verifier = Verifier(ModelRunner.from_folder(target_dir, num_slots=32, max_seq_len=2048))
    # The ngram drafter's trees are tries of prompt-lookup matches, whatever the method.
    configs = [("6 nodes", "chain", chain_shape(6)), ("6 nodes", "ngram trie", TreeShape("rsd-c", (3, 1))),
               ("12 nodes", "chain", chain_shape(12)), ("12 nodes", "ngram trie", TreeShape("rsd-c", (3, 1, 1, 1)))]
    return run_table("SmolLM2-135M with the ngram drafter, batch 16", NgramDrafter(), verifier, prompts, [16],
                     args.temperatures, args.max_new, configs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["pair", "ngram", "all"], default="all")
    parser.add_argument("--prompts", type=int, default=8, help="prompts for the pair")
    parser.add_argument("--prompt-set", choices=["humaneval", "sharegpt"], default="humaneval",
                        help="the pair's prompts: HumanEval tasks or ShareGPT's opening user turns")
    parser.add_argument("--settings", default="6,depth3",
                        help=f"the pair's comparisons, of {', '.join(SETTINGS)}: equal node budgets, equal depth")
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--batches", default="1,4", help="batch sizes for the pair")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    args.settings = args.settings.split(",")
    unknown = [name for name in args.settings if name not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = []
    if args.part in ("ngram", "all"):
        tables.append(ngram_part(args))
    if args.part in ("pair", "all"):
        tables.append(pair_part(args))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
