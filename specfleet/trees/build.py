"""Draft tree construction: RSD-C (Gumbel-Top-k at every node), RSD-S (Stochastic Beam Search) and the iid
baseline, batched over sequences (Recursive Speculative Decoding, Jeon et al. 2024, sections 3.2 and 3.3).

Each builder asks the draft model once per level for every frontier node of every row, draws the level's
nodes, and records for each node the exact distribution it was drawn from given its path and its earlier
siblings (`DraftTree.draft_probs`), which is what recursive rejection sampling needs to stay lossless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from specfleet.trees.shapes import PAD_TOKEN, ROOT_PARENT
from specfleet.trees.structure import DraftTree, tree_depths
from specfleet.trees.without_replacement import (
    conditional_gumbel,
    gumbel_noise,
    gumbel_top_k,
    without_replacement_probs,
)

DraftLogProbs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""The draft model as tree construction sees it: ``(rows [m] int64, paths [m, length] int64) -> [m, vocab]``.

Row i asks for the draft's next-token log-probabilities in batch row ``rows[i]`` after the committed
prefix followed by the draft tokens ``paths[i]`` (``length`` is 0 at the root). Log-probabilities are
of the processed distribution the drafter samples from (temperature, top-k, top-p, wire truncation),
with -inf for tokens it can never draw; each row must have some finite entry."""


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
    parents: torch.Tensor  # [batch, width] int64 global node index of the parent, ROOT_PARENT for the root
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
    out_tokens = torch.full((batch, width), PAD_TOKEN, dtype=torch.long, device=tokens.device)
    out_parents = torch.full_like(out_tokens, ROOT_PARENT)
    out_probs = torch.zeros(batch, width, draft_probs.shape[2], dtype=torch.float32, device=tokens.device)
    out_tokens[rows, dest] = tokens[rows, cols]
    old_parent = parents[rows, cols]
    out_parents[rows, dest] = torch.where(old_parent != ROOT_PARENT, new_index[rows, old_parent.clamp(min=0)],
                                          old_parent)
    out_probs[rows, dest] = draft_probs[rows, cols]
    return DraftTree(out_tokens, out_parents, tree_depths(out_parents), out_probs, num_nodes)


def _root_level(batch: int, device: torch.device) -> _Level:
    """The root as a one-node frontier: it is not a node of the tree, so its slot holds no token."""
    return _Level(tokens=torch.full((batch, 1), PAD_TOKEN, dtype=torch.long, device=device),
                  parents=torch.full((batch, 1), ROOT_PARENT, dtype=torch.long, device=device),
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
    frontier_offset = ROOT_PARENT  # global index of the frontier's first node; the root's is ROOT_PARENT
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
            probs = q.float()[:, None, :].expand(-1, b, -1) * (drawn_tokens != PAD_TOKEN)[..., None]
        else:
            drawn_tokens = gumbel_top_k(flat, b, uniforms).tokens
            probs = without_replacement_probs(q, drawn_tokens)
        tokens = drawn_tokens.reshape(batch, width, b)
        parent_ids = frontier_offset + torch.arange(width, device=device) if levels else torch.full(
            (width,), ROOT_PARENT, device=device)
        level = _Level(
            tokens=tokens.reshape(batch, width * b),
            parents=parent_ids.long().repeat_interleave(b)[None, :].expand(batch, -1).clone(),
            valid=((tokens != PAD_TOKEN) & frontier.valid[..., None]).reshape(batch, width * b),
            draft_probs=probs.reshape(batch, width * b, vocab),
            paths=torch.cat([frontier.paths.repeat_interleave(b, dim=1), tokens.reshape(batch, width * b, 1)],
                            dim=2),
        )
        frontier_offset = sum(lv.tokens.shape[1] for lv in levels)
        levels.append(level)
        frontier = level
    return _assemble(levels)


def _independent_draws(q: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:  # [m, b] int64
    """b independent inverse-CDF draws per row of q ([m, vocab]); PAD_TOKEN for rows with no mass (invalid nodes)."""
    cdf = torch.cumsum(q.double(), dim=-1)
    tokens = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1:]).contiguous(), right=True)
    last = q.shape[1] - 1 - (q > 0).flip(-1).to(torch.uint8).argmax(dim=-1, keepdim=True)
    return torch.where(cdf[:, -1:] > 0, torch.minimum(tokens, last), torch.full_like(tokens, PAD_TOKEN))


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
    frontier_offset = ROOT_PARENT
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
        tokens = torch.where(valid, tokens, torch.full_like(tokens, PAD_TOKEN))
        parent_probs = torch.softmax(logprobs, dim=-1).nan_to_num(0.0).gather(
            1, parent_col[..., None].expand(-1, -1, vocab))  # [batch, keep, vocab]
        level = _Level(
            tokens=tokens,
            parents=(frontier_offset + parent_col) if levels else torch.full_like(parent_col, ROOT_PARENT),
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
    tokens: torch.Tensor,  # [batch, keep] kept tokens in descending perturbed value, PAD_TOKEN for none
) -> torch.Tensor:  # [batch, keep, vocab] float32
    """q_i for every kept node: its parent's q without the tokens of its earlier-kept siblings."""
    keep = tokens.shape[1]
    present = tokens != PAD_TOKEN
    earlier = torch.ones(keep, keep, dtype=torch.bool, device=tokens.device).tril(-1)  # [i, j]: j before i
    same_parent = parent_col[:, :, None] == parent_col[:, None, :]  # [batch, keep, keep]
    removes = (earlier & same_parent & present[:, None, :]).double()  # [batch, i, j]
    one_hot = torch.zeros(*tokens.shape, parent_probs.shape[2], dtype=torch.float64, device=tokens.device)
    one_hot.scatter_(-1, tokens.clamp(min=0)[..., None], present[..., None].double())
    removed = removes @ one_hot  # [batch, keep, vocab]: 1 where an earlier sibling drew the token
    probs = parent_probs.double() * (removed == 0)
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return (probs * present[..., None]).float()
