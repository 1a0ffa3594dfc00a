"""Draft trees: construction by sampling without replacement (RSD), tree attention masks, position ids.

Plain functions on tensors, vectorised over a batch of sequences (one tree per row, ragged node
counts). Recursive Speculative Decoding (Jeon et al. 2024, arXiv 2402.14160) drafts the siblings
of every node *without replacement*, which keeps the tree diverse and lets the verifier
(`specfleet.verify.verify_tree`) run recursive rejection sampling over them losslessly:
- RSD-C: Gumbel-Top-k at every node, a constant branching factor per level (`build_tree_rsd_c`);
- RSD-S: Stochastic Beam Search over the draft model (Kool et al. 2019, "Stochastic Beams and Where
  to Find Them"), keeping the b most likely sampled-without-replacement sequences per level and so
  truncating unlikely branches early (`build_tree_rsd_s`).
Deterministic drafters that offer several distinct candidates per node (n-gram lookups) make trees
with point-mass draft distributions (`point_mass_tree`, `tree_from_paths`).

The target scores every node in one forward pass (SpecInfer, Miao et al. 2024): each node attends
to the committed prefix and to its own ancestors (`tree_attention_mask`) at position prefix length +
depth (`tree_position_ids`).

Layout of a tree, per batch row: nodes are numbered 0..num_nodes-1 with every parent before its
children, and the children of a node appear in the order they were drawn. The *root* is the last
committed token; it is not a node, and its children have parent -1 and depth 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

DraftLogProbs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""The draft model as tree construction sees it: ``(rows [m] int64, paths [m, length] int64) -> [m, vocab]``.

Row i asks for the draft's next-token log-probabilities in batch row ``rows[i]`` after the committed
prefix followed by the draft tokens ``paths[i]`` (``length`` is 0 at the root). Log-probabilities are
of the processed distribution the drafter samples from (temperature, top-k, top-p, wire truncation),
with -inf for tokens it can never draw; each row must have some finite entry."""


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

    tokens: torch.Tensor  # [batch, nodes] int64, -1 in padding
    parents: torch.Tensor  # [batch, nodes] int64: parent node index, -1 for the root's children and in padding
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
        if ((self.parents >= node_ids) & valid).any() or (self.parents < -1).any():
            raise ValueError("every node's parent must be -1 (the root) or an earlier node")
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
        while node >= 0:
            path.append(node)
            node = int(self.parents[row, node])
        return path[::-1]

    def path_tokens(self, row: int, node: int) -> list[int]:
        """The draft tokens on the path from the root down to ``node``."""
        return [int(self.tokens[row, j]) for j in self.path(row, node)]


def tree_depths(parents: torch.Tensor) -> torch.Tensor:  # [..., nodes] int64
    """Depth of every node (0 for the root's children), from ``parents`` ([..., nodes], -1 = root)."""
    depths = torch.zeros_like(parents)
    ancestor = parents.clone()
    for _ in range(parents.shape[-1]):
        has_ancestor = ancestor >= 0
        if not has_ancestor.any():
            break
        depths += has_ancestor.long()
        ancestor = torch.where(has_ancestor, parents.gather(-1, ancestor.clamp(min=0)), ancestor)
    return depths


def tree_attention_mask(parents: torch.Tensor) -> torch.Tensor:  # [..., nodes, nodes] bool
    """mask[..., i, j] is True iff node j is node i or one of its ancestors.

    ``parents`` is [..., nodes] with -1 for the root's children; padding nodes (parent -1) see only
    themselves. Together with the committed prefix, which every node sees, this is the tree attention
    of SpecInfer (Miao et al. 2024): each node's forward pass equals that of its path run as a chain.
    """
    nodes = parents.shape[-1]
    mask = torch.eye(nodes, dtype=torch.bool, device=parents.device).expand(*parents.shape, nodes).clone()
    ancestor = parents.clone()
    for _ in range(nodes):
        has_ancestor = ancestor >= 0
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
    """(first_child, next_sibling) as node indices, -1 for none; first_child[:, 0] is the root's and
    first_child[:, j + 1] node j's, so the children of a node are visited in the order drawn."""
    batch, nodes = tree.tokens.shape
    device = tree.tokens.device
    rows = torch.arange(batch, device=device)
    first_child = torch.full((batch, nodes + 1), -1, dtype=torch.long, device=device)
    next_sibling = torch.full((batch, nodes), -1, dtype=torch.long, device=device)
    valid = tree.valid
    # Inserting children last to first at the head of their parent's list leaves them in drawn order.
    for node in range(nodes - 1, -1, -1):
        real = valid[:, node]
        slot = tree.parents[:, node] + 1  # [batch]
        next_sibling[:, node] = torch.where(real, first_child[rows, slot], next_sibling[:, node])
        first_child[rows, slot] = torch.where(real, torch.full_like(slot, node), first_child[rows, slot])
    return first_child, next_sibling


# ---------------------------------------------------------------------------------------------------
# Sampling siblings without replacement.


@dataclass
class GumbelTopK:
    """k tokens per row sampled without replacement, in the order drawn."""

    tokens: torch.Tensor
    """[m, k] int64: the k largest Gumbel-perturbed log-probabilities; -1 where the row has fewer than
    k tokens of nonzero probability."""
    perturbed: torch.Tensor
    """[m, k] float64: their perturbed log-probabilities, descending; -inf where tokens is -1."""


def gumbel_noise(uniforms: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel samples -log(-log u) from uniforms in [0, 1), in float64 (u = 0 is nudged up)."""
    tiny = torch.finfo(torch.float64).tiny
    return -torch.log(-torch.log(uniforms.double().clamp(min=tiny)))


def gumbel_top_k(
    draft_logprobs: torch.Tensor,  # [m, vocab], -inf for impossible tokens
    k: int,
    uniforms: torch.Tensor,  # [m, vocab] in [0, 1)
) -> GumbelTopK:
    """Gumbel-Top-k: k distinct tokens per row, distributed as k draws without replacement from
    softmax(draft_logprobs), in the order drawn (Kool et al. 2019; RSD-C in Jeon et al. 2024).

    Perturbing each log-probability with independent Gumbel noise and taking the k largest yields x_1
    with probability q(x_1), then x_2 with q(x_2) / (1 - q(x_1)), and so on.
    """
    if draft_logprobs.dim() != 2:
        raise ValueError(f"draft_logprobs must be [m, vocab], got shape {tuple(draft_logprobs.shape)}")
    if uniforms.shape != draft_logprobs.shape:
        raise ValueError(f"uniforms must be [m, vocab] = {list(draft_logprobs.shape)}, got {list(uniforms.shape)}")
    if not 1 <= k <= draft_logprobs.shape[1]:
        raise ValueError(f"k must be in [1, vocab] = [1, {draft_logprobs.shape[1]}], got {k}")
    perturbed = draft_logprobs.double() + gumbel_noise(uniforms).to(draft_logprobs.device)
    values, tokens = torch.topk(perturbed, k, dim=-1)
    possible = values > -torch.inf
    return GumbelTopK(torch.where(possible, tokens, torch.full_like(tokens, -1)), values)


def without_replacement_probs(
    draft_probs: torch.Tensor,  # [m, vocab] the distribution the siblings were drawn from
    tokens: torch.Tensor,  # [m, k] int64 siblings in the order drawn, -1 for none
) -> torch.Tensor:  # [m, k, vocab] float32
    """The distribution each sibling was drawn from: q with the earlier siblings removed, renormalised.

    Entry [:, i] is q_i = q * 1[x not in x_1..x_{i-1}] / (1 - q(x_1) - ... - q(x_{i-1})), the q_i of
    RSD's recursive rejection sampling; rows for absent siblings (-1) are zero.
    """
    if draft_probs.dim() != 2 or tokens.dim() != 2 or tokens.shape[0] != draft_probs.shape[0]:
        raise ValueError(f"need draft_probs [m, vocab] and tokens [m, k], got shapes "
                         f"{tuple(draft_probs.shape)} and {tuple(tokens.shape)}")
    m, k = tokens.shape
    present = tokens >= 0  # [m, k]
    drawn = torch.zeros(m, k, draft_probs.shape[1], dtype=torch.float64, device=draft_probs.device)
    drawn.scatter_(-1, tokens.clamp(min=0)[..., None], present[..., None].double())
    earlier = torch.cumsum(drawn, dim=1) - drawn  # [m, k, vocab]: 1 where an earlier sibling drew the token
    probs = draft_probs.double()[:, None, :] * (earlier == 0)
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return (probs * present[..., None]).float()


# ---------------------------------------------------------------------------------------------------
# Tree construction.

Generators = torch.Generator | Sequence[torch.Generator]
"""One generator for the whole batch, or one per row (then a row's tree depends only on its own
generator and the shape, not on which other rows share the batch)."""


def _uniforms(generator: Generators, batch: int, width: int, vocab: int) -> torch.Tensor:  # [batch, width, vocab]
    if isinstance(generator, torch.Generator):
        return torch.rand(batch, width, vocab, generator=generator, dtype=torch.float64)
    if len(generator) != batch:
        raise ValueError(f"need one generator per row ({batch}), got {len(generator)}")
    return torch.stack([torch.rand(width, vocab, generator=g, dtype=torch.float64) for g in generator])


@dataclass
class _Level:
    """The nodes of one depth while a tree is being built, [batch, width] each."""

    tokens: torch.Tensor  # [batch, width] int64
    parents: torch.Tensor  # [batch, width] int64 global node index of the parent, -1 for the root
    valid: torch.Tensor  # [batch, width] bool
    draft_probs: torch.Tensor  # [batch, width, vocab] float32
    paths: torch.Tensor  # [batch, width, depth + 1] int64 draft tokens from the root's child to the node


def _expand(draft_logprobs: DraftLogProbs, paths: torch.Tensor, valid: torch.Tensor, vocab: int | None
            ) -> torch.Tensor:  # [batch, width, vocab] float64
    """Ask the draft model about every valid frontier node at once; -inf rows for invalid ones."""
    batch, width, _ = paths.shape
    rows, cols = valid.nonzero(as_tuple=True)
    logprobs = draft_logprobs(rows, paths[rows, cols]).double()
    if logprobs.dim() != 2 or logprobs.shape[0] != len(rows) or (vocab is not None and logprobs.shape[1] != vocab):
        raise ValueError(f"draft_logprobs must return [{len(rows)}, vocab], got shape {tuple(logprobs.shape)}")
    out = torch.full((batch, width, logprobs.shape[1]), -torch.inf, dtype=torch.float64, device=logprobs.device)
    out[rows, cols] = logprobs
    return out


def _assemble(levels: list[_Level]) -> DraftTree:
    """Concatenate levels (parents first) and move each row's valid nodes to the front, in order."""
    tokens = torch.cat([level.tokens for level in levels], dim=1)
    parents = torch.cat([level.parents for level in levels], dim=1)
    valid = torch.cat([level.valid for level in levels], dim=1)
    draft_probs = torch.cat([level.draft_probs for level in levels], dim=1)
    batch, total = tokens.shape
    # New index of every valid node; a parent is always valid when its child is.
    new_index = torch.cumsum(valid.long(), dim=1) - 1  # [batch, total]
    num_nodes = valid.sum(dim=1)
    width = int(num_nodes.max()) if batch else 0
    rows, cols = valid.nonzero(as_tuple=True)
    dest = new_index[rows, cols]
    out_tokens = torch.full((batch, width), -1, dtype=torch.long, device=tokens.device)
    out_parents = torch.full_like(out_tokens, -1)
    out_probs = torch.zeros(batch, width, draft_probs.shape[2], dtype=torch.float32, device=tokens.device)
    out_tokens[rows, dest] = tokens[rows, cols]
    old_parent = parents[rows, cols]
    out_parents[rows, dest] = torch.where(old_parent >= 0, new_index[rows, old_parent.clamp(min=0)], old_parent)
    out_probs[rows, dest] = draft_probs[rows, cols]
    return DraftTree(out_tokens, out_parents, tree_depths(out_parents), out_probs, num_nodes)


def _root_level(batch: int, device: torch.device) -> _Level:
    return _Level(tokens=torch.full((batch, 1), -1, dtype=torch.long, device=device),
                  parents=torch.full((batch, 1), -1, dtype=torch.long, device=device),
                  valid=torch.ones(batch, 1, dtype=torch.bool, device=device),
                  draft_probs=torch.zeros(batch, 1, 0, device=device),
                  paths=torch.zeros(batch, 1, 0, dtype=torch.long, device=device))


def build_tree_rsd_c(
    draft_logprobs: DraftLogProbs,
    batch: int,
    branching: Sequence[int],
    generator: Generators,
    device: torch.device | str = "cpu",
    replacement: bool = False,
) -> DraftTree:
    """RSD-C (Jeon et al. 2024, section 3.2): every node at depth d gets ``branching[d]`` children,
    drawn without replacement from the draft distribution at that node by Gumbel-Top-k.

    With ``replacement`` the children are instead independent draws from q (SpecInfer-style
    independent sampling, the baseline RSD improves on): siblings may repeat a token and each one's
    ``draft_probs`` is q itself.

    The tree has up to b_0 + b_0 b_1 + ... nodes per row (fewer where a draft distribution has fewer
    possible tokens than the branching). The draft model is asked once per level for every frontier
    node of every row. Each node's ``draft_probs`` is the without-replacement q_i it was drawn from.
    """
    if not branching or any(b < 1 for b in branching):
        raise ValueError(f"branching must be a non-empty list of positive ints, got {list(branching)}")
    device = torch.device(device)
    frontier = _root_level(batch, device)
    frontier_offset = -1  # global index of the frontier's first node; the root is -1
    levels: list[_Level] = []
    vocab: int | None = None
    for b in branching:
        logprobs = _expand(draft_logprobs, frontier.paths, frontier.valid, vocab)  # [batch, width, vocab]
        width, vocab = logprobs.shape[1], logprobs.shape[2]
        if b > vocab:
            raise ValueError(f"branching {b} exceeds the vocabulary ({vocab} tokens)")
        flat = logprobs.reshape(batch * width, vocab)
        uniforms = _uniforms(generator, batch, width, vocab).reshape(batch * width, vocab).to(device)
        q = torch.softmax(flat, dim=-1).nan_to_num(0.0)
        if replacement:
            drawn_tokens = _independent_draws(q, uniforms[:, :b])
            probs = q.float()[:, None, :].expand(-1, b, -1) * (drawn_tokens >= 0)[..., None]
        else:
            drawn_tokens = gumbel_top_k(flat, b, uniforms).tokens
            probs = without_replacement_probs(q, drawn_tokens)
        tokens = drawn_tokens.reshape(batch, width, b)
        parent_ids = frontier_offset + torch.arange(width, device=device) if levels else torch.full(
            (width,), -1, device=device)
        level = _Level(
            tokens=tokens.reshape(batch, width * b),
            parents=parent_ids.long().repeat_interleave(b)[None, :].expand(batch, -1).clone(),
            valid=((tokens >= 0) & frontier.valid[..., None]).reshape(batch, width * b),
            draft_probs=probs.reshape(batch, width * b, vocab),
            paths=torch.cat([frontier.paths.repeat_interleave(b, dim=1), tokens.reshape(batch, width * b, 1)],
                            dim=2),
        )
        frontier_offset = sum(lv.tokens.shape[1] for lv in levels)
        levels.append(level)
        frontier = level
    return _assemble(levels)


def _independent_draws(q: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:  # [m, b] int64
    """b independent inverse-CDF draws per row of q ([m, vocab]); -1 for rows with no mass (invalid nodes)."""
    cdf = torch.cumsum(q.double(), dim=-1)
    tokens = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1:]).contiguous(), right=True)
    last = q.shape[1] - 1 - (q > 0).flip(-1).to(torch.uint8).argmax(dim=-1, keepdim=True)
    return torch.where(cdf[:, -1:] > 0, torch.minimum(tokens, last), torch.full_like(tokens, -1))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def conditional_gumbel(
    perturbed: torch.Tensor,  # [..., vocab] float64: log q + Gumbel noise, -inf for impossible tokens
    parent_value: torch.Tensor,  # [...] float64: the parent's perturbed value T
) -> torch.Tensor:  # [..., vocab] float64
    """Shift a node's independently perturbed children so that their maximum is exactly T.

    Stochastic Beam Search (Kool et al. 2019, equation 23 and appendix B): G = -log(exp(-T) -
    exp(-Z) + exp(-G~)) with Z the largest child, computed stably. The map is increasing in G~, so the
    children keep their Gumbel-Top-k order (sampling without replacement from q).
    """
    top = perturbed.max(dim=-1, keepdim=True).values
    parent_value = parent_value[..., None]
    possible = perturbed > -torch.inf
    safe = torch.where(possible, perturbed, top)
    v = parent_value - safe + _log1mexp((safe - top).clamp(max=0.0))
    shifted = parent_value - v.clamp(min=0.0) - torch.log1p(torch.exp(-v.abs()))
    return torch.where(possible, shifted, torch.full_like(shifted, -torch.inf))


def build_tree_rsd_s(
    draft_logprobs: DraftLogProbs,
    batch: int,
    beam_width: int,
    depth: int,
    generator: Generators,
    device: torch.device | str = "cpu",
) -> DraftTree:
    """RSD-S (Jeon et al. 2024, section 3.3): Stochastic Beam Search (Kool et al. 2019) over the draft.

    Level d holds the ``beam_width`` draft sequences of length d + 1 with the largest perturbed
    log-probabilities, which are ``beam_width`` sequences sampled without replacement from the draft;
    a node's children are the survivors among its own candidates, so unlikely branches are cut early.
    A node's children are always the first few of a without-replacement draw from the draft
    distribution q at that node (their perturbed values keep the Gumbel-Top-k order), so each child's
    ``draft_probs`` is q with its earlier-drawn siblings removed and renormalised, exactly as in RSD-C.
    Whether one more child survives depends on its perturbed value and on the other beams; given its
    earlier siblings, that value is independent of which token it is (the Gumbel-max property), so the
    surviving child is still distributed as that q_i and recursive rejection stays lossless. Nodes of
    a level are stored in descending perturbed value.
    """
    if beam_width < 1 or depth < 1:
        raise ValueError(f"need beam_width >= 1 and depth >= 1, got {beam_width}, {depth}")
    device = torch.device(device)
    frontier = _root_level(batch, device)
    frontier_values = torch.zeros(batch, 1, dtype=torch.float64, device=device)  # root: log-prob 0, value 0
    frontier_logprob = torch.zeros(batch, 1, dtype=torch.float64, device=device)
    frontier_offset = -1
    levels: list[_Level] = []
    vocab: int | None = None
    for _ in range(depth):
        logprobs = _expand(draft_logprobs, frontier.paths, frontier.valid, vocab)  # [batch, width, vocab]
        width, vocab = logprobs.shape[1], logprobs.shape[2]
        uniforms = _uniforms(generator, batch, width, vocab).to(device)
        sequence_logprob = frontier_logprob[..., None] + logprobs  # [batch, width, vocab]
        values = conditional_gumbel(sequence_logprob + gumbel_noise(uniforms), frontier_values)
        values = torch.where(frontier.valid[..., None], values, torch.full_like(values, -torch.inf))
        keep = min(beam_width, width * vocab)
        kept_values, flat_ids = torch.topk(values.reshape(batch, width * vocab), keep, dim=-1)  # descending
        parent_col, tokens = flat_ids // vocab, flat_ids % vocab  # [batch, keep]
        valid = kept_values > -torch.inf
        tokens = torch.where(valid, tokens, torch.full_like(tokens, -1))
        parent_probs = torch.softmax(logprobs, dim=-1).nan_to_num(0.0).gather(
            1, parent_col[..., None].expand(-1, -1, vocab))  # [batch, keep, vocab]
        level = _Level(
            tokens=tokens,
            parents=(frontier_offset + parent_col) if levels else torch.full_like(parent_col, -1),
            valid=valid,
            draft_probs=_beam_sibling_probs(parent_probs, parent_col, tokens),
            paths=torch.cat([frontier.paths.gather(1, parent_col[..., None].expand(-1, -1, frontier.paths.shape[2])),
                             tokens[..., None]], dim=2),
        )
        frontier_offset = sum(lv.tokens.shape[1] for lv in levels)
        levels.append(level)
        frontier = level
        frontier_values = torch.where(valid, kept_values, torch.full_like(kept_values, -torch.inf))
        frontier_logprob = sequence_logprob.reshape(batch, width * vocab).gather(1, flat_ids)
    return _assemble(levels)


def _beam_sibling_probs(
    parent_probs: torch.Tensor,  # [batch, keep, vocab] the draft q at each kept node's parent
    parent_col: torch.Tensor,  # [batch, keep] which frontier node is the parent
    tokens: torch.Tensor,  # [batch, keep] kept tokens in descending perturbed value, -1 for none
) -> torch.Tensor:  # [batch, keep, vocab] float32
    """q_i for every kept node: its parent's q without the tokens of its earlier-kept siblings."""
    keep = tokens.shape[1]
    present = tokens >= 0
    earlier = torch.ones(keep, keep, dtype=torch.bool, device=tokens.device).tril(-1)  # [i, j]: j before i
    same_parent = parent_col[:, :, None] == parent_col[:, None, :]  # [batch, keep, keep]
    removes = (earlier & same_parent & present[:, None, :]).double()  # [batch, i, j]
    one_hot = torch.zeros(*tokens.shape, parent_probs.shape[2], dtype=torch.float64, device=tokens.device)
    one_hot.scatter_(-1, tokens.clamp(min=0)[..., None], present[..., None].double())
    removed = removes @ one_hot  # [batch, keep, vocab]: 1 where an earlier sibling drew the token
    probs = parent_probs.double() * (removed == 0)
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return (probs * present[..., None]).float()


def point_mass_tree(
    tokens: torch.Tensor,  # [batch, nodes] int64, -1 in padding
    parents: torch.Tensor,  # [batch, nodes] int64, -1 for the root's children
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
    return DraftTree(torch.where(valid, tokens, -1), torch.where(valid, parents, -1), tree_depths(
        torch.where(valid, parents, -1)), probs, num_nodes.long())


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
                parents.append(index[key[:-1]] if end > 1 else -1)
    return point_mass_tree(torch.tensor([tokens], dtype=torch.long).reshape(1, -1),
                           torch.tensor([parents], dtype=torch.long).reshape(1, -1),
                           torch.tensor([len(tokens)]), vocab_size)


# ---------------------------------------------------------------------------------------------------
# Tree shapes and node budgets.

TREE_METHODS = ("rsd-c", "rsd-s", "iid")
"""RSD-C and RSD-S sample siblings without replacement; iid (a benchmark baseline, SpecInfer-style)
samples them independently, with replacement, in RSD-C's shapes."""


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
    verifier tried the children in the order drawn until one was accepted, or all of them."""
    parent = -1
    for depth, node in enumerate([*path, None]):
        children = [j for j, p in enumerate(parents) if p == parent]
        tried = len(children) if node is None else children.index(node) + 1
        for i in range(tried):
            yield depth, i, node is not None and i == tried - 1
        parent = node


@dataclass(frozen=True)
class TryCounts:
    """The tries recursive rejection made in one step, split by how the policy models them: the first child
    tried at a node is drawn from the draft as a chain's token is, its later siblings only after an elder's
    rejection and against the target's residual, which accepts them less often."""

    first_rejected: int
    later_accepted: int
    later_tried: int


def count_tries(parents: Sequence[int], path: Sequence[int]) -> TryCounts:
    """`TryCounts` of a step whose accepted path is ``path`` (node indices from the root's child). Over many
    steps, with one acceptance chance per first try, first accepted / (first accepted + first rejected) is its
    maximum-likelihood rate (for a chain: a rejection is the chain stopping short of its end), and later
    accepted / later tried the rate of later siblings."""
    first_rejected = later_accepted = later_tried = 0
    for _, i, accepted in try_outcomes(parents, path):
        if i == 0:
            first_rejected += not accepted
        else:
            later_accepted += accepted
            later_tried += 1
    return TryCounts(first_rejected, later_accepted, later_tried)
