"""DuoDecoding's multi-sequence drafts: how many sequences the rule drafts, on hand-built distributions, and the
trees it builds (RSD-C's (k, 1, ...) per row). Their losslessness is tested with every other tree's, in
test_trees.py (``duo_4x2``; on its toy draft duo branches in two of seven contexts, too few for a wrong sibling q to
show, so the harness's power against that is shown on the RSD-C trees whose builder duo calls), and greedy decoding
through a real drafter and verifier in test_tree_wire.py."""

from __future__ import annotations

import math

import pytest
import torch

from specfleet.config import RouterConfig
from specfleet.trees.duo import build_tree_duo, duo_branches
from specfleet.trees.shapes import ROOT_PARENT, TreeShape


def _log(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


def test_one_sequence_per_alternative_likelier_than_the_two_token_continuation() -> None:
    first = torch.tensor([_log(0.5, 0.3, 0.15, 0.05), _log(0.5, 0.3, 0.15, 0.05), _log(0.4, 0.3, 0.2, 0.1),
                          _log(0.97, 0.01, 0.01, 0.01)])
    # Continuations after the likeliest first token: 0.9 (0.45 two-token: no alternative beats it), 0.4 (0.2: the
    # 0.3 alternative does, 0.15 does not), 0.2 (0.08: all three do), 0.99 (0.96: sure, one sequence).
    continuation = torch.tensor(_log(0.9, 0.4, 0.2, 0.99))
    assert duo_branches(first, continuation, 8).tolist() == [1, 2, 4, 1]
    assert duo_branches(first, continuation, 3).tolist() == [1, 2, 3, 1]  # capped
    assert duo_branches(first, continuation, 1).tolist() == [1, 1, 1, 1]
    # Counting stops at the first alternative that does not beat it, even if a later one would (ties included).
    assert duo_branches(torch.tensor([_log(0.4, 0.2, 0.2, 0.2)]), torch.tensor(_log(0.5)), 8).tolist() == [1]
    # Scaled log-probabilities (as greedy trees scale them) give the same answer.
    assert duo_branches(first * 1e4, continuation * 1e4, 8).tolist() == [1, 2, 4, 1]
    with pytest.raises(ValueError, match="max_branches"):
        duo_branches(first, continuation, 0)


def test_the_tree_has_that_many_distinct_first_tokens_each_a_chain() -> None:
    vocab, levels = 6, 3
    unsure = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.05, 0.05]).log()
    after = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1]).log()
    sure = torch.tensor([0.95, 0.01, 0.01, 0.01, 0.01, 0.01]).log()

    def draft_logprobs(rows: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        # Row 0 is unsure at the first position, less so after it; row 1 is sure everywhere.
        return torch.stack([sure if int(r) == 1 else after if paths.shape[1] else unsure for r in rows])

    tree = build_tree_duo(draft_logprobs, 2, 4, levels, torch.Generator().manual_seed(0))
    # Row 0: two-token continuation 0.3 x 0.5 = 0.15, beaten by 0.25 and 0.2, not by 0.15: 3 sequences.
    expected = duo_branches(torch.stack([unsure, sure]), torch.stack([after.max(), sure.max()]), 4).tolist()
    assert expected == [3, 1]
    for row, k in enumerate(expected):
        n = int(tree.num_nodes[row])
        parents = tree.parents[row, :n].tolist()
        roots = [j for j, p in enumerate(parents) if p == ROOT_PARENT]
        assert len(roots) == k and n == k * levels
        assert len({int(tree.tokens[row, j]) for j in roots}) == k  # distinct first tokens
        assert all(parents.count(j) <= 1 for j in range(n))  # chains below them
        assert torch.allclose(tree.draft_probs[row, :n].sum(-1), torch.ones(n))
    assert tree.draft_probs.shape[-1] == vocab


def test_duo_shape_and_router_flags() -> None:
    with pytest.raises(ValueError, match="chains below"):
        TreeShape("duo", (3, 2))
    shape = RouterConfig(tree="duo", tree_branching="4", max_depth=5).tree_shape
    assert shape == TreeShape("duo", (4, 1, 1, 1, 1)) and shape.nodes == 20 and shape.level_tries()[0] == 4
    assert shape.fit(8, 5) == TreeShape("duo", (4, 1))  # fewer levels before fewer sequences
    assert shape.fit(3, 5) == TreeShape("duo", (3,))
