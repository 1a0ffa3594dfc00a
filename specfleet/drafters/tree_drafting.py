"""What every drafter that builds draft trees shares, whatever computes its logits: the distributions trees are drawn
from, the choice of builder for a shape, and the tree as a `DraftResult`.

A drafter gives the builders of `specfleet.trees` a ``draft_logprobs(rows, paths)`` over its own model (tree
attention in the engine, copies of a sequence's KV cache in llama.cpp); the rest is here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from specfleet.drafters.base import DraftRequest, DraftResult
from specfleet.sampling import DRAFT_STREAM, processed_probs, seeded_generator, top_k_pairs
from specfleet.sampling_params import SamplingParams
from specfleet.trees.build import DraftLogProbs, build_tree_rsd_c, build_tree_rsd_s
from specfleet.trees.duo import build_tree_duo
from specfleet.trees.shapes import TreeShape
from specfleet.trees.structure import DraftTree

GREEDY_TREE_SCALE = 1e4
"""Greedy trees multiply the draft's log-probabilities by this before tree construction, so the Gumbel
noise (within about [-7, 37]) cannot reorder tokens whose log-probabilities differ by more than ~0.005:
the tree is then the draft's most likely tokens, deterministically (greedy verification needs no q)."""


def tree_shapes(requests: Sequence[DraftRequest], max_levels: Callable[[DraftRequest], int] | None = None
                ) -> dict[TreeShape | None, list[DraftRequest]]:
    """The tree requests grouped by the shape each gets: its own, cut to its node budget and depth (and to
    ``max_levels`` where the drafter's cache allows fewer levels); None where nothing fits."""
    groups: dict[TreeShape | None, list[DraftRequest]] = {}
    for r in requests:
        assert r.tree is not None
        levels = r.depth if max_levels is None else min(r.depth, max_levels(r))
        groups.setdefault(r.tree.fit(r.max_nodes or r.tree.nodes, levels), []).append(r)
    return groups


def tree_logprobs(sampling: Sequence[SamplingParams], logits: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Log of the exact distribution each sampled row draws from (processed, truncated to the top-K pairs sent on the
    wire, -inf elsewhere); greedy rows get the draft's top-K log-probabilities scaled by GREEDY_TREE_SCALE."""
    k = min(num_pairs, logits.shape[-1])
    greedy = torch.tensor([p.greedy for p in sampling])
    probs = processed_probs(logits, torch.tensor([1.0 if p.greedy else p.temperature for p in sampling]),
                            torch.tensor([p.top_k for p in sampling]), torch.tensor([p.top_p for p in sampling]))
    ids, pair_probs = top_k_pairs(probs, k)
    # The pairs' logs scattered over -inf: the log of their dense distribution (the ids are distinct) without a log
    # over the whole vocabulary per row.
    logprobs = torch.full(probs.shape, -torch.inf).scatter_(-1, ids, pair_probs.log())
    return torch.where(greedy[:, None], logprobs * GREEDY_TREE_SCALE, logprobs)


def build_tree(shape: TreeShape | None, group: Sequence[DraftRequest], draft_logprobs: DraftLogProbs,
               vocab_size: int) -> DraftTree:
    """One tree per request of ``group`` (rows in order), all of ``shape`` (None: empty trees), each drawn with the
    generator its seed and position give (so a row's tree does not depend on the rows beside it)."""
    if shape is None:
        empty = torch.zeros(len(group), 0, dtype=torch.long)
        return DraftTree(empty, empty, empty, torch.zeros(len(group), 0, vocab_size),
                         torch.zeros(len(group), dtype=torch.long))
    generators = [seeded_generator(r.seed, r.position, DRAFT_STREAM) for r in group]
    if shape.method == "rsd-s":
        return build_tree_rsd_s(draft_logprobs, len(group), shape.beam_width, shape.depth, generators)
    if shape.method == "duo":
        return build_tree_duo(draft_logprobs, len(group), shape.branching[0], shape.levels, generators)
    return build_tree_rsd_c(draft_logprobs, len(group), shape.branching, generators,
                            replacement=shape.method == "iid")


def tree_result(request: DraftRequest, tree: DraftTree, row: int, num_pairs: int, cached_len: int) -> DraftResult:
    """Row ``row`` of ``tree`` as the answer to ``request``: its nodes, their parents and, sampled, each node's q."""
    n = int(tree.num_nodes[row])
    draft_top_k = None
    if not request.sampling.greedy:
        # Each node's q_i has at most K tokens (a subset of the top-K pairs), so its top-K is all of it.
        draft_top_k = top_k_pairs(tree.draft_probs[row, :n], min(num_pairs, tree.vocab_size)) if n else (
            torch.empty(0, num_pairs, dtype=torch.long), torch.empty(0, num_pairs))
    return DraftResult(request.seq_id, known=True, tokens=tree.tokens[row, :n].tolist(), draft_top_k=draft_top_k,
                       cached_len=cached_len, parents=tree.parents[row, :n].tolist())
