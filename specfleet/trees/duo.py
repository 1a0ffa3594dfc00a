"""DuoDecoding's dynamic multi-sequence drafts (Lv et al. 2025, arXiv 2503.00784, section 3.3).

When the draft is sure of its next token, one sequence is the best use of a draft budget; when it is unsure, several
sequences that start with different first tokens raise the chance that one of them starts right. The rule reads the
draft's own distributions: with ``top`` the likeliest first token and ``cont`` the likeliest token after it, the
draft drafts one sequence per first-position alternative (in order of likelihood) that is more likely on its own
than the two-token continuation ``top, cont``, stopping at the first that is not, up to a cap.

The sequences are an RSD-C tree with branching (k, 1, 1, ...): the k first tokens are drawn without replacement
(Gumbel-Top-k), each then continued as a chain, so the existing recursive rejection sampler verifies them losslessly
(`specfleet.verify.verify_tree`), greedy and sampled.
"""

from __future__ import annotations

import torch

from specfleet.trees.build import DraftLogProbs, Generators, build_tree_rsd_c
from specfleet.trees.shapes import PAD_TOKEN, ROOT_PARENT
from specfleet.trees.structure import DraftTree, tree_depths


def duo_branches(first_logprobs: torch.Tensor, continuation_logprobs: torch.Tensor, max_branches: int
                 ) -> torch.Tensor:  # [batch] int64 in 1..max_branches
    """How many sequences each row drafts: 1 + how many of the first position's alternatives, second likeliest
    first, are each more likely than the likeliest two-token continuation, counted until the first that is not.

    ``first_logprobs`` [batch, vocab]: the draft's log-probabilities at the first draft position;
    ``continuation_logprobs`` [batch]: the log-probability of the likeliest token after the likeliest first token.
    Any positive multiple of log-probabilities gives the same answer (the comparison is linear)."""
    if max_branches < 1:
        raise ValueError(f"max_branches must be >= 1, got {max_branches}")
    top = first_logprobs.topk(min(max_branches, first_logprobs.shape[-1]), dim=-1).values  # [batch, <= max]
    two_tokens = top[:, :1] + continuation_logprobs[:, None]  # [batch, 1]
    unsure = torch.cumprod((top[:, 1:] > two_tokens).long(), dim=-1)  # 1 while each alternative beats it
    return 1 + unsure.sum(dim=-1)


def build_tree_duo(draft_logprobs: DraftLogProbs, batch: int, max_branches: int, levels: int, generator: Generators,
                   device: torch.device | str = "cpu") -> DraftTree:
    """Per row, `duo_branches` sequences of ``levels`` tokens with distinct first tokens: an RSD-C tree of branching
    (k, 1, ..., 1), k chosen per row from the draft's own distributions (one extra draft call, after the likeliest
    first token). Rows that draft as many sequences are built together."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    rows = torch.arange(batch, device=device)
    first = draft_logprobs(rows, torch.zeros(batch, 0, dtype=torch.long, device=device)).double()
    continuation = draft_logprobs(rows, first.argmax(dim=-1, keepdim=True)).double().max(dim=-1).values
    branches = duo_branches(first, continuation, max_branches)
    trees: dict[int, tuple[torch.Tensor, DraftTree]] = {}
    for k in branches.unique().tolist():
        members = (branches == k).nonzero(as_tuple=True)[0]

        def member_logprobs(sub_rows: torch.Tensor, paths: torch.Tensor, members: torch.Tensor = members
                            ) -> torch.Tensor:
            return draft_logprobs(members[sub_rows], paths)

        member_generators = generator if isinstance(generator, torch.Generator) else [
            generator[i] for i in members.tolist()]
        trees[k] = (members, build_tree_rsd_c(member_logprobs, len(members), (k, *([1] * (levels - 1))),
                                              member_generators, device))
    return _merge(batch, list(trees.values()))


def _merge(batch: int, parts: list[tuple[torch.Tensor, DraftTree]]) -> DraftTree:
    """One batch of trees from trees built for subsets of its rows (``members``: their rows), padded to the widest."""
    width = max(tree.max_nodes for _, tree in parts)
    vocab = parts[0][1].draft_probs.shape[-1]
    device = parts[0][1].tokens.device
    tokens = torch.full((batch, width), PAD_TOKEN, dtype=torch.long, device=device)
    parents = torch.full_like(tokens, ROOT_PARENT)
    probs = torch.zeros(batch, width, vocab, dtype=torch.float32, device=device)
    num_nodes = torch.zeros(batch, dtype=torch.long, device=device)
    for members, tree in parts:
        nodes = tree.max_nodes
        tokens[members, :nodes] = tree.tokens
        parents[members, :nodes] = tree.parents
        probs[members, :nodes] = tree.draft_probs
        num_nodes[members] = tree.num_nodes
    return DraftTree(tokens, parents, tree_depths(parents), probs, num_nodes)
