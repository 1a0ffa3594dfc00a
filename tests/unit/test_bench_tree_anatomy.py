"""The tree-anatomy bench's arithmetic: which tries a step made, and the best static tree for given rates."""

from __future__ import annotations

import pytest

from bench.tree_anatomy import (
    best_static_tree,
    chain_accepted,
    describe_tree,
    policy_predictions,
    tree_nodes,
    try_rates,
)


def test_try_rates_count_per_depth_and_try():
    assert try_rates([([-1, 0, 1], [0]), ([-1, 0, 1], [0, 1, 2])]) == {(0, 0): (2, 2), (1, 0): (1, 2), (2, 0): (1, 1)}


def test_chain_accepted_truncates_a_deeper_chain():
    walks = [([-1, 0, 1, 2], [0, 1, 2]), ([-1, 0, 1, 2], [])]
    assert chain_accepted(walks, 2) == 1.0
    assert chain_accepted(walks, 4) == 1.5


def _expected_accepted(shape, rate, depth: int = 0) -> float:
    """Sum over nodes of P(node accepted), walking the tree directly."""
    total, reach = 0.0, 1.0
    for i, child in enumerate(shape):
        r = rate(depth, i)
        total += reach * r * (1.0 + _expected_accepted(child, rate, depth + 1))
        reach *= 1.0 - r
    return total


def _all_shapes(nodes: int, max_children: int):
    """Every ordered tree of exactly ``nodes`` nodes below a root, at most ``max_children`` children per node."""
    if nodes == 0:
        yield ()
        return
    for first in range(1, nodes + 1):
        for child in _all_shapes(first - 1, max_children):
            for rest in _all_shapes(nodes - first, max_children):
                if len(rest) < max_children:
                    yield (child, *rest)


def test_all_shapes_enumerates_every_ordered_tree():
    assert [len(set(_all_shapes(n, n))) for n in range(6)] == [1, 1, 2, 5, 14, 42]  # the Catalan numbers


@pytest.mark.parametrize("a1,a2", [(0.85, 0.4), (0.6, 0.4), (0.4, 0.5)])
def test_best_static_tree_matches_exhaustive_search(a1: float, a2: float):
    rate = lambda depth, i: (a1 - 0.02 * depth) if i == 0 else (a2 if i == 1 else 0.2)  # noqa: E731
    for nodes in range(1, 7):
        value, shape = best_static_tree(rate, nodes, max_children=3)
        best = max(_expected_accepted(s, rate) for s in _all_shapes(nodes, 3))
        assert value == pytest.approx(best) and value == pytest.approx(_expected_accepted(shape, rate))
        assert tree_nodes(shape) <= nodes


def test_high_first_try_rate_makes_the_chain_best_and_low_rate_branches():
    high = best_static_tree(lambda d, i: 0.85 if i == 0 else 0.4, 6, max_children=3)[1]
    low = best_static_tree(lambda d, i: 0.5 if i == 0 else 0.5, 6, max_children=3)[1]
    assert describe_tree(high) == "6"
    assert len(low) > 1


def test_describe_tree():
    assert describe_tree(((((),),), ((),))) == "(3 | 2)"
    assert describe_tree((((),),)) == "2"
    assert describe_tree(((((),), ()),)) == "1>(2 | 1)"


def test_policy_predictions_read_the_rates_off_the_walks():
    walks = [([-1, -1, 0, 0, 1], [1, 4]), ([-1, -1, 0, 0, 1], [])]  # 2 accepted; 2 first tries and 1 sibling rejected
    measured, lumped, lumped_rate, split, alpha, beta = policy_predictions(walks, (2, 2))
    assert (measured, lumped_rate, alpha, beta) == pytest.approx((1.0, 2 / 5, 1 / 3, 1 / 2))
    assert lumped == pytest.approx((1 - 0.6 ** 2) * (1 + (1 - 0.6 ** 2)))
    assert split == pytest.approx((1 - (2 / 3) * 0.5) * (1 + (1 - (2 / 3) * 0.5)))
