"""Why a chain or a tree wins at a node budget: how often each try is accepted, and the best tree it allows.

Runs a chain and a wide RSD-C tree with the real pair (the same code as ``bench.trees``) and counts, at
every depth, how often recursive rejection accepted the first, second, third draft it tried at a node.
Then it asks which tree of N nodes would accept the most under those rates (the positional model of
Sequoia, Chen et al. 2024, with the first try's rate taken from the chain at each depth so that runs of
easy tokens count): a later sibling is tried only after its earlier siblings were rejected, so a later
sibling is worth (1 - first-try rate) x (its own rate), against the chain's next node, worth the chance of
getting that deep. It also asks the same with every later sibling accepted whenever tried: if the chain still
wins then, no way of drafting later siblings can beat it at that budget.

    python -m bench.tree_anatomy                         # HumanEval, batch 1, temperature 1
    python -m bench.tree_anatomy --prompt-set sharegpt   # where the pair agrees less often
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from functools import cache

from bench.common import chat_ids
from bench.prompts import humaneval_prompts, sharegpt_prompts
from bench.trees import decode
from specfleet.drafters.model import ModelDrafter
from specfleet.engine import ModelRunner
from specfleet.models import load_tokenizer, resolve_model
from specfleet.policy import acceptance_estimate, tree_expected_emitted
from specfleet.sampling_params import SamplingParams
from specfleet.stats import AcceptanceCounts, SequenceStep
from specfleet.trees.shapes import TreeShape, chain_shape, count_tries, try_outcomes
from target_service.verifier import Verifier

Subtree = tuple["Subtree", ...]
"""A static tree shape as the nested tuple of a node's children (a leaf is ``()``), tried in order."""


def try_rates(walks: Iterable[tuple[Sequence[int], Sequence[int]]]) -> dict[tuple[int, int], tuple[int, int]]:
    """(depth, try index) -> (accepted, tried) over many steps' walks."""
    counts: dict[tuple[int, int], tuple[int, int]] = {}
    for parents, path in walks:
        for depth, i, accepted in try_outcomes(parents, path):
            hit, tried = counts.get((depth, i), (0, 0))
            counts[(depth, i)] = (hit + accepted, tried + 1)
    return counts


def policy_predictions(walks: Sequence[tuple[Sequence[int], Sequence[int]]], tries: Sequence[int]
                       ) -> tuple[float, float, float, float, float, float]:
    """Mean accepted drafts per step of a tree run, and what the policy's model predicts from the run's own
    counts: (measured, lumped prediction, its rate, split prediction, alpha, beta). Lumped: one rate for every
    try, accepted / (accepted + rejected tries); split: first tries at alpha, later siblings at beta."""
    counts = AcceptanceCounts()  # kept as the router keeps them
    for parents, path in walks:
        step = count_tries(parents, path)
        counts.observe(SequenceStep(len(parents), len(parents), len(path), step.first_rejected,
                                    step.later_siblings_accepted, step.later_siblings_tried))
    accepted = counts.accepted
    lumped = acceptance_estimate(accepted, counts.rejections + counts.later_siblings_rejected, 0.0, prior_weight=0.0)
    alpha = acceptance_estimate(counts.first_accepted, counts.rejections, 0.0, prior_weight=0.0)
    beta = acceptance_estimate(counts.later_siblings_accepted, counts.later_siblings_rejected, alpha,
                               prior_weight=0.0)
    return (accepted / len(walks), tree_expected_emitted(lumped, tries) - 1, lumped,
            tree_expected_emitted(alpha, tries, beta) - 1, alpha, beta)


def best_static_tree(rate: Callable[[int, int], float], nodes: int, max_children: int) -> tuple[float, Subtree]:
    """The tree of at most ``nodes`` nodes with the most expected accepted drafts, when the i-th child tried at
    a node of depth d is accepted with probability ``rate(d, i)`` given its earlier siblings were rejected.

    Dynamic programming over (nodes left, depth, next try): a child accepted with r adds 1 plus the best its
    own subtree can do; rejected, the remaining nodes go to its later siblings."""

    @cache
    def below(n: int, depth: int) -> tuple[float, Subtree]:
        return tries(n, depth, 0)

    @cache
    def tries(n: int, depth: int, i: int) -> tuple[float, Subtree]:
        best: tuple[float, Subtree] = (0.0, ())
        if n == 0 or i >= max_children:
            return best
        r = rate(depth, i)
        for size in range(1, n + 1):
            sub_value, sub_shape = below(size - 1, depth + 1)
            rest_value, rest_shape = tries(n - size, depth, i + 1)
            value = r * (1.0 + sub_value) + (1.0 - r) * rest_value
            if value > best[0] + 1e-12:
                best = (value, (sub_shape, *rest_shape))
        return best

    return below(nodes, 0)


def tree_nodes(shape: Subtree) -> int:
    return sum(1 + tree_nodes(child) for child in shape)


def describe_tree(shape: Subtree) -> str:
    """``6`` for a chain of six, ``(5 | 1)`` for two root children with chains of 5 and 1, ``2>(3 | 1)``..."""
    if not shape:
        return ""
    if len(shape) > 1:
        return "(" + " | ".join(describe_tree((child,)) for child in shape) + ")"
    run, node = 0, shape
    while len(node) == 1:
        run, node = run + 1, node[0]
    return f"{run}>{describe_tree(node)}" if node else str(run)


def chain_accepted(walks: Sequence[tuple[Sequence[int], Sequence[int]]], depth: int) -> float:
    """Mean accepted drafts per step had the chain been ``depth`` deep (its first ``depth`` drafts are drawn
    and tried exactly as a shorter chain's are)."""
    return sum(min(len(path), depth) for _, path in walks) / len(walks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts, each decoded alone (batch 1)")
    parser.add_argument("--prompt-set", choices=["humaneval", "sharegpt"], default="humaneval",
                        help="HumanEval tasks or ShareGPT's opening user turns")
    parser.add_argument("--max-new", type=int, default=48, help="new tokens per prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--chain-depth", type=int, default=12,
                        help="depth of the chain that measures first tries (and every chain up to it)")
    parser.add_argument("--tree", default="3,2,2", help="RSD-C branching of the wide tree that measures later siblings")
    parser.add_argument("--budgets", default="3,6,12", help="node budgets to find the best tree for")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]

    target_dir, draft_dir = resolve_model("qwen2.5-coder-1.5b"), resolve_model("qwen2.5-coder-0.5b")
    tokenizer = load_tokenizer(target_dir)
    texts = humaneval_prompts(args.prompts) if args.prompt_set == "humaneval" else sharegpt_prompts(args.prompts)
    prompts = [chat_ids(tokenizer, t) for t in texts]
    drafter = ModelDrafter(ModelRunner.from_folder(draft_dir, num_slots=2, max_seq_len=1024))
    verifier = Verifier(ModelRunner.from_folder(target_dir, num_slots=2, max_seq_len=1024))
    sampling = SamplingParams(temperature=args.temperature)
    wide = TreeShape("rsd-c", tuple(int(b) for b in args.tree.split(",")))
    chain_walks, tree_walks = [], []
    for prompt in prompts:
        chain_walks += decode(drafter, verifier, [prompt], chain_shape(args.chain_depth), sampling, args.max_new,
                              "chain").walks
        tree_walks += decode(drafter, verifier, [prompt], wide, sampling, args.max_new, "tree").walks
    chain, tree = try_rates(chain_walks), try_rates(tree_walks)

    def share(counts: dict[tuple[int, int], tuple[int, int]], key: tuple[int, int]) -> str:
        hit, tried = counts.get(key, (0, 0))
        return f"{hit / tried:.2f} ({tried})" if tried else "-"

    tries = max(wide.branching)
    print(f"### Accepted share per try, {args.prompt_set}, batch 1, temperature {args.temperature:g} "
          f"({len(chain_walks)} chain steps, {len(tree_walks)} tree steps)\n")
    print("| depth | chain, 1st try | " + " | ".join(f"rsd-c {wide.describe().split()[1]}, try {i + 1}"
                                                  for i in range(tries)) + " |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in range(tries)) + " |")
    for depth in range(args.chain_depth):
        print(f"| {depth + 1} | {share(chain, (depth, 0))} | "
              + " | ".join(share(tree, (depth, i)) for i in range(tries)) + " |")

    def pooled(counts: dict[tuple[int, int], tuple[int, int]], i: int) -> float:
        hit = sum(h for (_, j), (h, _) in counts.items() if j == i)
        tried = sum(t for (_, j), (_, t) in counts.items() if j == i)
        return hit / tried if tried else 0.0

    def rate(depth: int, i: int) -> float:
        if i > 0:
            return pooled(tree, i)
        hit, tried = chain.get((min(depth, args.chain_depth - 1), 0), (0, 0))
        return hit / tried if tried >= 10 else pooled(chain, 0)

    def later_siblings_always_accepted(depth: int, i: int) -> float:
        return rate(depth, 0) if i == 0 else 1.0

    print("\n| nodes | chain, measured | chain, by the rates | best tree by the rates | its shape "
          "| best tree if every sibling tried were accepted | its shape |")
    print("| ---: | ---: | ---: | ---: | --- | ---: | --- |")
    for nodes in budgets:
        chain_model, _ = best_static_tree(rate, nodes, max_children=1)
        best_value, best_shape = best_static_tree(rate, nodes, max_children=tries)
        bound, bound_shape = best_static_tree(later_siblings_always_accepted, nodes, max_children=tries)
        print(f"| {nodes} | {chain_accepted(chain_walks, nodes):.2f} | {chain_model:.2f} | {best_value:.2f} | "
              f"{describe_tree(best_shape)} | {bound:.2f} | {describe_tree(bound_shape)} |")
    measured, lumped, lumped_rate, split, alpha, beta = policy_predictions(tree_walks, wide.branching)
    print(f"\nRSD-C {args.tree}: {measured:.2f} accepted drafts per step; the policy's model, from the same counts, "
          f"predicts {lumped:.2f} with one rate for every try ({lumped_rate:.2f}) and {split:.2f} with first tries "
          f"({alpha:.2f}) and later siblings ({beta:.2f}) apart.")
    print("\nThe first try's rate at each depth is the chain's, so 'chain, by the rates' equals the measured chain "
          "by construction;\na sibling's is pooled over depths, and the last two columns take it as 1, the most any "
          "sibling sampler could reach.")


if __name__ == "__main__":
    main()
