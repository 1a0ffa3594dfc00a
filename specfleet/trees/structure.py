"""Draft tree structure: the `DraftTree` record, node depths, tree attention masks, position ids, sibling
links, and point-mass trees from deterministic drafters (see `specfleet.trees` for the words).

Plain functions on tensors, vectorised over a batch of sequences (one tree per row, ragged node counts).
The target scores every node in one forward pass (SpecInfer, Miao et al. 2024): each node attends to the
committed prefix and to its own ancestors (`tree_attention_mask`) at position prefix length + depth
(`tree_position_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specfleet.trees.shapes import NO_NODE, PAD_TOKEN, ROOT_PARENT


@dataclass
class DraftTree:
    """A batch of draft trees as flat arrays, one tree per row, padded to the widest.

    ``draft_probs[b, j]`` is the exact distribution node j's token was drawn from, given its path and
    its earlier siblings: for siblings drawn without replacement from a draft distribution q (RSD-C,
    RSD-S) the i-th child's is q with the first i-1 children's tokens removed and renormalised; for
    siblings drawn independently (with replacement, as in SpecInfer) it is q itself; for a
    deterministic drafter it is a point mass on the node's token, whatever its siblings. This is what
    the recursive rejection sampler needs at each try (Jeon et al. 2024, section 3), and it reads as a
    chain's ``draft_probs`` does when the tree is a chain.
    """

    tokens: torch.Tensor  # [batch, nodes] int64, PAD_TOKEN in padding
    parents: torch.Tensor  # [batch, nodes] int64: parent node index, ROOT_PARENT for the root's children and in padding
    depths: torch.Tensor  # [batch, nodes] int64: 0 for the root's children, 0 in padding
    draft_probs: torch.Tensor  # [batch, nodes, vocab] float32, 0 in padding
    num_nodes: torch.Tensor  # [batch] int64

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, nodes], got shape {tuple(self.tokens.shape)}")
        batch, nodes = self.tokens.shape
        for name in ("parents", "depths"):
            if getattr(self, name).shape != (batch, nodes):
                raise ValueError(f"{name} must be [batch, nodes] = [{batch}, {nodes}], "
                                 f"got shape {tuple(getattr(self, name).shape)}")
        if self.draft_probs.dim() != 3 or self.draft_probs.shape[:2] != (batch, nodes):
            raise ValueError(f"draft_probs must be [batch, nodes, vocab] with [batch, nodes] = [{batch}, {nodes}], "
                             f"got shape {tuple(self.draft_probs.shape)}")
        if self.num_nodes.shape != (batch,):
            raise ValueError(f"num_nodes must be [batch] = [{batch}], got shape {tuple(self.num_nodes.shape)}")
        valid = self.valid
        node_ids = torch.arange(nodes, device=self.parents.device)[None, :]
        if ((self.parents >= node_ids) & valid).any() or (self.parents < ROOT_PARENT).any():
            raise ValueError(f"every node's parent must be {ROOT_PARENT} (the root) or an earlier node")
        if not torch.equal(self.depths * valid, tree_depths(self.parents) * valid):
            raise ValueError("depths must be the number of ancestors of each node (0 for the root's children)")

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_nodes(self) -> int:
        return self.tokens.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.draft_probs.shape[2]

    @property
    def valid(self) -> torch.Tensor:  # [batch, nodes] bool
        """True for real nodes, False for padding."""
        return torch.arange(self.max_nodes, device=self.tokens.device)[None, :] < self.num_nodes[:, None]

    def path(self, row: int, node: int) -> list[int]:
        """Node indices from the root's child down to ``node`` (inclusive)."""
        path = []
        while node != ROOT_PARENT:
            path.append(node)
            node = int(self.parents[row, node])
        return path[::-1]

    def path_tokens(self, row: int, node: int) -> list[int]:
        """The draft tokens on the path from the root down to ``node``."""
        return [int(self.tokens[row, j]) for j in self.path(row, node)]


def tree_depths(parents: torch.Tensor) -> torch.Tensor:  # [..., nodes] int64
    """Depth of every node (0 for the root's children), from ``parents`` ([..., nodes], ROOT_PARENT = root)."""
    depths = torch.zeros_like(parents)
    ancestor = parents.clone()
    for _ in range(parents.shape[-1]):
        has_ancestor = ancestor != ROOT_PARENT
        if not has_ancestor.any():
            break
        depths += has_ancestor.long()
        ancestor = torch.where(has_ancestor, parents.gather(-1, ancestor.clamp(min=0)), ancestor)
    return depths


def tree_attention_mask(parents: torch.Tensor) -> torch.Tensor:  # [..., nodes, nodes] bool
    """mask[..., i, j] is True iff node j is node i or one of its ancestors.

    ``parents`` is [..., nodes] with ROOT_PARENT for the root's children; padding nodes (parent ROOT_PARENT)
    see only themselves. Together with the committed prefix, which every node sees, this is the tree attention
    of SpecInfer (Miao et al. 2024): each node's forward pass equals that of its path run as a chain.
    """
    nodes = parents.shape[-1]
    mask = torch.eye(nodes, dtype=torch.bool, device=parents.device).expand(*parents.shape, nodes).clone()
    ancestor = parents.clone()
    for _ in range(nodes):
        has_ancestor = ancestor != ROOT_PARENT
        if not has_ancestor.any():
            break
        mask |= torch.nn.functional.one_hot(ancestor.clamp(min=0), nodes).bool() & has_ancestor[..., None]
        ancestor = torch.where(has_ancestor, parents.gather(-1, ancestor.clamp(min=0)), ancestor)
    return mask


def tree_position_ids(
    depths: torch.Tensor,  # [..., nodes] int64
    prefix_len: int | torch.Tensor,  # int, or [...] committed tokens per tree
) -> torch.Tensor:  # [..., nodes] int64
    """Position of every node: the committed prefix length plus its depth, as if its path were a chain."""
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.shape != depths.shape[:-1]:
            raise ValueError(f"prefix_len must be {tuple(depths.shape[:-1])}, got shape {tuple(prefix_len.shape)}")
        prefix_len = prefix_len[..., None]
    return depths + prefix_len


def sibling_links(tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:  # ([batch, nodes + 1], [batch, nodes])
    """(first_child, next_sibling) as node indices, NO_NODE for none; first_child[:, 0] is the root's and
    first_child[:, j + 1] node j's, so the children of a node are visited in the order drawn: a node's first
    try, then its later siblings."""
    batch, nodes = tree.tokens.shape
    device = tree.tokens.device
    rows = torch.arange(batch, device=device)
    first_child = torch.full((batch, nodes + 1), NO_NODE, dtype=torch.long, device=device)
    next_sibling = torch.full((batch, nodes), NO_NODE, dtype=torch.long, device=device)
    valid = tree.valid
    # Inserting children last to first at the head of their parent's list leaves them in drawn order.
    for node in range(nodes - 1, -1, -1):
        real = valid[:, node]
        slot = tree.parents[:, node] + 1  # [batch]: the root's children (ROOT_PARENT) go to slot 0
        next_sibling[:, node] = torch.where(real, first_child[rows, slot], next_sibling[:, node])
        first_child[rows, slot] = torch.where(real, torch.full_like(slot, node), first_child[rows, slot])
    return first_child, next_sibling


def point_mass_tree(
    tokens: torch.Tensor,  # [batch, nodes] int64, arbitrary in padding
    parents: torch.Tensor,  # [batch, nodes] int64, ROOT_PARENT for the root's children, arbitrary in padding
    num_nodes: torch.Tensor,  # [batch] int64
    vocab_size: int,
) -> DraftTree:
    """A tree from a deterministic drafter: every node's draft distribution is a point mass on its token.

    A drafter that deterministically offers several distinct candidates at a node draws the i-th
    candidate with certainty given the earlier ones, so q_i is the point mass on candidate i (not the
    candidates' spread, and nothing to remove). Recursive rejection then accepts candidate i with the
    target's residual probability of it and, on rejection, removes it from the target's residual.
    """
    if tokens.dim() != 2 or parents.shape != tokens.shape:
        raise ValueError(f"tokens and parents must be [batch, nodes], got shapes {tuple(tokens.shape)} "
                         f"and {tuple(parents.shape)}")
    valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < num_nodes[:, None]
    probs = torch.zeros(*tokens.shape, vocab_size, dtype=torch.float32, device=tokens.device)
    probs.scatter_(-1, tokens.clamp(min=0)[..., None], valid[..., None].float())
    parents = torch.where(valid, parents, ROOT_PARENT)
    return DraftTree(torch.where(valid, tokens, PAD_TOKEN), parents, tree_depths(parents), probs, num_nodes.long())


def tree_from_paths(paths: Sequence[Sequence[int]], vocab_size: int) -> DraftTree:
    """A one-row point-mass tree merging candidate continuations (e.g. several n-gram matches) into a trie.

    Shared prefixes become shared nodes; siblings keep the order in which they first appear, which is
    the order the verifier tries them.
    """
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, ...], int] = {}
    for path in paths:
        for end in range(1, len(path) + 1):
            key = tuple(path[:end])
            if key not in index:
                index[key] = len(tokens)
                tokens.append(int(path[end - 1]))
                parents.append(index[key[:-1]] if end > 1 else ROOT_PARENT)
    return point_mass_tree(torch.tensor([tokens], dtype=torch.long).reshape(1, -1),
                           torch.tensor([parents], dtype=torch.long).reshape(1, -1),
                           torch.tensor([len(tokens)]), vocab_size)
