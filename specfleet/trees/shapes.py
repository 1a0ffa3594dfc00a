"""Tree shapes, node budgets and try counting, free of torch so that the router and the wire import them cheaply.

A `TreeShape` says what to draft (RSD-C, RSD-S or iid, and how wide and deep); `try_outcomes` and `count_tries`
read which nodes recursive rejection tried in a step from the tree's parent list and the accepted path. The
words (root, node, first try, later sibling) are those of `specfleet.trees`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

ROOT_PARENT = -1
"""The parent index of the root's children (draft tokens that follow the last committed token directly): the
root is the last committed token, not a node, so it has no node index of its own."""
PAD_TOKEN = -1
"""A token slot that holds no node (padding past a row's nodes, or an absent sibling where a distribution has
fewer possible tokens than asked for): no token id is negative, so it can never be mistaken for a real token."""
NO_NODE = -1
"""A node index slot that names no node (past the end of an accepted path, a node without a child or a next
sibling): node indices start at 0, so it can never be mistaken for a real node."""

TREE_METHODS = ("rsd-c", "rsd-s", "iid", "duo")
"""RSD-C and RSD-S sample siblings without replacement; iid (a benchmark baseline, SpecInfer-style)
samples them independently, with replacement, in RSD-C's shapes; duo drafts up to ``branching[0]`` sequences with
distinct first tokens, as many as the draft is unsure of (DuoDecoding's rule, `specfleet.trees.duo`), each
continued as a chain: RSD-C's shape (k, 1, 1, ...) with k chosen per sequence and step."""


@dataclass(frozen=True)
class TreeShape:
    """What to draft: RSD-C (or iid) with ``branching[d]`` children per node at depth d, or RSD-S
    keeping ``beam_width`` sequences per level for ``depth`` levels."""

    method: str
    branching: tuple[int, ...] = ()
    beam_width: int = 0
    depth: int = 0

    def __post_init__(self) -> None:
        if self.method not in TREE_METHODS:
            raise ValueError(f"tree method must be one of {TREE_METHODS}, got {self.method!r}")
        if self.method != "rsd-s" and (not self.branching or min(self.branching) < 1):
            raise ValueError(f"{self.method} needs a non-empty branching of positive ints, got {list(self.branching)}")
        if self.method == "duo" and any(b != 1 for b in self.branching[1:]):
            raise ValueError(f"duo drafts chains below its first tokens: branching (k, 1, 1, ...), got "
                             f"{list(self.branching)}")
        if self.method == "rsd-s" and (self.beam_width < 1 or self.depth < 1):
            raise ValueError(f"rsd-s needs beam_width >= 1 and depth >= 1, got {self.beam_width}, {self.depth}")

    @property
    def levels(self) -> int:
        return self.depth if self.method == "rsd-s" else len(self.branching)

    @property
    def nodes(self) -> int:
        """Most nodes the tree can have (fewer where a draft distribution has fewer possible tokens)."""
        if self.method == "rsd-s":
            return self.beam_width * self.depth
        total, width = 0, 1
        for b in self.branching:
            width *= b
            total += width
        return total

    @property
    def is_chain(self) -> bool:
        return self.method != "rsd-s" and all(b == 1 for b in self.branching)

    def level_tries(self) -> tuple[int, ...]:
        """Children of the accepted node at each level: the candidates recursive rejection tries there.
        Exact for RSD-C and iid; for RSD-S an approximation: the whole beam at the first level, then at most two
        (a beam keeps its survivors under the likeliest nodes, so an accepted node usually has a fallback)."""
        if self.method != "rsd-s":
            return self.branching
        return (self.beam_width, *([min(self.beam_width, 2)] * (self.depth - 1)))

    def fit(self, max_nodes: int, max_depth: int) -> TreeShape | None:
        """The largest shape like this one with at most ``max_nodes`` nodes and ``max_depth`` levels:
        RSD-C narrows its deepest levels first, RSD-S loses levels (or beams, below one level); None
        when nothing fits."""
        if max_nodes < 1 or max_depth < 1:
            return None
        if self.method == "rsd-s":
            if self.beam_width > max_nodes:
                return TreeShape("rsd-s", beam_width=max_nodes, depth=1)
            return TreeShape("rsd-s", beam_width=self.beam_width,
                             depth=min(self.depth, max_depth, max_nodes // self.beam_width))
        branching = list(self.branching[:max_depth])
        while TreeShape(self.method, tuple(branching)).nodes > max_nodes:
            if branching[-1] > 1:
                branching[-1] -= 1
            else:
                branching.pop()
        return TreeShape(self.method, tuple(branching))

    def describe(self) -> str:
        if self.method == "rsd-s":
            return f"rsd-s {self.beam_width}x{self.depth}"
        return f"{self.method} " + ",".join(map(str, self.branching))


def chain_shape(depth: int) -> TreeShape:
    """A chain of ``depth`` tokens as a shape (RSD-C with branching 1 everywhere)."""
    return TreeShape("rsd-c", (1,) * depth)


def parse_branching(text: str) -> tuple[int, ...]:
    """``"2,2,1"`` -> (2, 2, 1); raises ValueError for anything else."""
    try:
        branching = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise ValueError(f"branching must be comma-separated positive ints like 2,2,1, got {text!r}") from None
    if not branching or min(branching) < 1:
        raise ValueError(f"branching must be comma-separated positive ints like 2,2,1, got {text!r}")
    return branching


def try_outcomes(parents: Sequence[int], path: Sequence[int]) -> Iterator[tuple[int, int, bool]]:
    """(depth, try index, accepted) for every draft node recursive rejection tried in one step.

    ``path`` is the accepted nodes from the root's child down: at the root and at each node on it the
    verifier tried the children in the order drawn until one was accepted, or all of them. Try index 0 is
    a node's first try, the others its later siblings."""
    parent = ROOT_PARENT
    for depth, node in enumerate([*path, None]):
        children = [j for j, p in enumerate(parents) if p == parent]
        tried = len(children) if node is None else children.index(node) + 1
        for i in range(tried):
            yield depth, i, node is not None and i == tried - 1
        parent = node


@dataclass(frozen=True)
class TryCounts:
    """The tries recursive rejection made in one step, split by how the policy models them: a node's first try is
    drawn from the draft as a chain's token is, a later sibling only after its earlier siblings were rejected,
    against the target's residual, which accepts it less often."""

    first_rejected: int
    later_siblings_accepted: int
    later_siblings_tried: int


def count_tries(parents: Sequence[int], path: Sequence[int]) -> TryCounts:
    """`TryCounts` of a step whose accepted path is ``path`` (node indices from the root's child). Over many
    steps, with one acceptance chance per first try, first tries accepted / (accepted + rejected) is its
    maximum-likelihood rate (for a chain: a rejection is the chain stopping short of its end), and later siblings
    accepted / later siblings tried the rate of later siblings."""
    first_rejected = later_siblings_accepted = later_siblings_tried = 0
    for _, i, accepted in try_outcomes(parents, path):
        if i == 0:
            first_rejected += not accepted
        else:
            later_siblings_accepted += accepted
            later_siblings_tried += 1
    return TryCounts(first_rejected, later_siblings_accepted, later_siblings_tried)
