"""Verification of draft tokens against the target model: greedy, lossless chain rejection sampling,
and lossless recursive rejection sampling over draft trees.

Plain functions on tensors, vectorised over a batch of sequences with ragged draft lengths (or ragged
trees). Every step emits the accepted draft tokens plus exactly one token from the target.

Glossary (each word means one thing only; the tree words are those of `specfleet.trees`):
- *accepted* token: a draft token that passed its acceptance test (equal to the target's argmax when
  greedy; u < min(1, p / q) when sampled). A step accepts a prefix of a chain, or a path of a tree.
- *recovered* token: the target's token after a rejection, sampled from the residual norm(max(0, p - q)).
- *bonus* token: the target's token when nothing was rejected (every draft accepted, or the accepted path
  reached a leaf of the tree), sampled from the target's own distribution.
- *first try*: the first-drawn child of the root or of an accepted node, the first draft tried there.
- *later sibling*: a child tried after its earlier siblings were all rejected, against the target's residual
  (recursive rejection sampling, Jeon et al. 2024).
- `target_probs` / `draft_probs`: dense distributions [..., vocab], p of the target and q each draft token
  was drawn from (given its earlier siblings, in a tree).
- the wire's *top-K pairs* (`draft_top_k`): q as it travels between services, the draft's K most probable
  (token id, probability) pairs per draft token; `specfleet.sampling.dense_from_top_k` makes `draft_probs`
  of them.
- `PAD_TOKEN` fills token slots past a step's output; `NO_NODE` fills node slots past an accepted path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specfleet.sampling import sample_from_probs
from specfleet.trees.shapes import NO_NODE, PAD_TOKEN, ROOT_PARENT
from specfleet.trees.structure import DraftTree, sibling_links


@dataclass
class VerifyResult:
    """Outcome of one verification step for a batch of sequences."""

    accepted_counts: torch.Tensor
    """[batch] int64: how many draft tokens were accepted (0..draft_len)."""
    output_tokens: torch.Tensor
    """[batch, depth + 1] int64: the accepted draft tokens, then the recovered or bonus token; PAD_TOKEN after it."""

    def emitted(self, row: int) -> list[int]:
        """The tokens this step emits for one sequence: its accepted drafts and the one target token."""
        count = int(self.accepted_counts[row]) + 1
        return self.output_tokens[row, :count].tolist()


def _check_drafts(
    target: torch.Tensor, draft_tokens: torch.Tensor, draft_lens: torch.Tensor, target_name: str
) -> tuple[int, int, int]:
    """Check the shapes shared by both verifiers and return (batch, depth, vocab)."""
    if target.dim() != 3 or target.shape[1] < 1:
        raise ValueError(f"{target_name} must be [batch, depth + 1, vocab], got shape {tuple(target.shape)}")
    batch, depth_plus_one, vocab = target.shape
    depth = depth_plus_one - 1
    if draft_tokens.shape != (batch, depth):
        raise ValueError(
            f"draft_tokens must be [batch, depth] = [{batch}, {depth}], got shape {tuple(draft_tokens.shape)}"
        )
    if draft_lens.shape != (batch,):
        raise ValueError(f"draft_lens must be [batch] = [{batch}], got shape {tuple(draft_lens.shape)}")
    return batch, depth, vocab


def _output_tokens(
    draft_tokens: torch.Tensor,  # [batch, depth]
    accepted_counts: torch.Tensor,  # [batch]
    next_tokens: torch.Tensor,  # [batch]
) -> torch.Tensor:  # [batch, depth + 1]
    """Accepted drafts, then the recovered or bonus token at index accepted_count, then PAD_TOKEN."""
    batch, depth = draft_tokens.shape
    positions = torch.arange(depth + 1, device=draft_tokens.device)[None, :]  # [1, depth + 1]
    padded = torch.cat([draft_tokens.long(), next_tokens.long()[:, None]], dim=1)  # [batch, depth + 1]
    counts = accepted_counts[:, None]
    out = torch.where(positions < counts, padded, torch.full_like(padded, PAD_TOKEN))
    return torch.where(positions == counts, next_tokens.long()[:, None], out)


def verify_greedy(
    target_logits: torch.Tensor,  # [batch, depth + 1, vocab]
    draft_tokens: torch.Tensor,  # [batch, depth] int64, arbitrary beyond draft_lens
    draft_lens: torch.Tensor,  # [batch] int64 in 0..depth
) -> VerifyResult:
    """Greedy verification: accept the longest prefix of drafts equal to the target's argmax.

    `target_logits[:, i]` is the target's prediction for draft position i (the last one predicts the
    token after a full draft). The step then emits the target's argmax at the first mismatch (the
    recovered token) or at position draft_len (the bonus token), so the output equals greedy decoding
    with the target alone (Leviathan et al. 2023). depth may be 0.
    """
    batch, depth, _ = _check_drafts(target_logits, draft_tokens, draft_lens, "target_logits")
    device = target_logits.device
    target_tokens = target_logits.argmax(dim=-1)  # [batch, depth + 1]
    positions = torch.arange(depth, device=device)[None, :]  # [1, depth]
    draft_lens = draft_lens.to(device).long()
    matches = (draft_tokens.to(device).long() == target_tokens[:, :depth]) & (positions < draft_lens[:, None])
    accepted_counts = torch.cumprod(matches.long(), dim=1).sum(dim=1)  # [batch]
    # Accepted drafts equal the target's argmax, so the whole output is the argmax up to accepted_count.
    output_positions = torch.arange(depth + 1, device=device)[None, :]
    output_tokens = torch.where(
        output_positions <= accepted_counts[:, None], target_tokens, torch.full_like(target_tokens, PAD_TOKEN)
    )
    return VerifyResult(accepted_counts=accepted_counts, output_tokens=output_tokens)


def verify_chain(
    target_probs: torch.Tensor,  # [batch, depth + 1, vocab]
    draft_tokens: torch.Tensor,  # [batch, depth] int64, arbitrary beyond draft_lens
    draft_probs: torch.Tensor,  # [batch, depth, vocab]
    draft_lens: torch.Tensor,  # [batch] int64 in 0..depth
    uniforms: torch.Tensor,  # [batch, depth + 1] in [0, 1)
) -> VerifyResult:
    """Lossless chain rejection sampling (Leviathan et al. 2023, "speculative sampling" in Chen et al. 2023).

    target_probs are the target's processed distributions p at each draft position and one after the
    last; draft_probs is the exact q each draft token was sampled from (a point mass for n-gram
    drafts). For i < draft_len, draft token x_i is accepted iff uniforms[:, i] < min(1, p(x_i) / q(x_i)).
    At the first rejection the recovered token is sampled from norm(max(0, p - q)) at that position;
    if every draft was accepted the bonus token is sampled from target_probs[:, draft_len]. Both use
    uniforms[:, depth] through `sample_from_probs`. If the residual has zero mass (p == q numerically)
    the recovered token is sampled from p instead. The emitted tokens are then distributed exactly as
    tokens sampled from the target one by one.
    """
    batch, depth, vocab = _check_drafts(target_probs, draft_tokens, draft_lens, "target_probs")
    if draft_probs.shape != (batch, depth, vocab):
        raise ValueError(
            f"draft_probs must be [batch, depth, vocab] = [{batch}, {depth}, {vocab}], "
            f"got shape {tuple(draft_probs.shape)}"
        )
    if uniforms.shape != (batch, depth + 1):
        raise ValueError(
            f"uniforms must be [batch, depth + 1] = [{batch}, {depth + 1}], got shape {tuple(uniforms.shape)}"
        )
    device = target_probs.device
    draft_lens = draft_lens.to(device).long()
    draft_tokens = draft_tokens.to(device).long()
    uniforms = uniforms.to(device=device, dtype=torch.float64)
    rows = torch.arange(batch, device=device)

    positions = torch.arange(depth, device=device)[None, :]  # [1, depth]
    valid = positions < draft_lens[:, None]  # [batch, depth]
    safe_tokens = torch.where(valid, draft_tokens, torch.zeros_like(draft_tokens))[..., None]  # padding -> 0
    p_draft = target_probs[:, :depth].gather(-1, safe_tokens).squeeze(-1).double()  # [batch, depth]
    q_draft = draft_probs.gather(-1, safe_tokens).squeeze(-1).double()  # [batch, depth]
    # u < min(1, p/q)  <=>  u * q < p  (u < 1), without dividing by q.
    accept = valid & (uniforms[:, :depth] * q_draft < p_draft)  # [batch, depth]
    accepted_counts = torch.cumprod(accept.long(), dim=1).sum(dim=1)  # [batch]

    # The recovered or bonus token is drawn at position accepted_count in both cases.
    p_next = target_probs[rows, accepted_counts].float()  # [batch, vocab]
    rejected = accepted_counts < draft_lens  # [batch]
    if depth > 0:
        q_next = draft_probs[rows, accepted_counts.clamp(max=depth - 1)].float()  # [batch, vocab]
        residual = (p_next - q_next).clamp(min=0.0)  # [batch, vocab]
        # A residual with any positive mass only holds tokens with p > q >= 0, so it is safe to sample.
        use_residual = rejected & (residual.sum(dim=-1) > 0)  # [batch]
        next_dist = torch.where(use_residual[:, None], residual, p_next)
    else:
        next_dist = p_next
    next_tokens = sample_from_probs(next_dist, uniforms[:, depth])  # [batch]

    output_tokens = _output_tokens(draft_tokens, accepted_counts, next_tokens)
    return VerifyResult(accepted_counts=accepted_counts, output_tokens=output_tokens)


@dataclass
class TreeVerifyResult(VerifyResult):
    """Outcome of verifying a batch of draft trees: the accepted path, then one target token."""

    accepted_nodes: torch.Tensor
    """[batch, max_depth] int64: node indices of the accepted path from the root down, NO_NODE after it;
    what `ModelRunner.keep_path` keeps of the tree's KV entries."""

    def accepted_path(self, row: int) -> list[int]:
        """Node indices of one sequence's accepted path."""
        return self.accepted_nodes[row, : int(self.accepted_counts[row])].tolist()


def _check_tree(target: torch.Tensor, tree: DraftTree, target_name: str) -> None:
    if target.dim() != 3 or target.shape[:2] != (tree.batch, tree.max_nodes + 1):
        raise ValueError(f"{target_name} must be [batch, nodes + 1, vocab] = [{tree.batch}, {tree.max_nodes + 1}, "
                         f"vocab], got shape {tuple(target.shape)}")


def _tree_result(tree: DraftTree, path: torch.Tensor, counts: torch.Tensor, next_tokens: torch.Tensor
                 ) -> TreeVerifyResult:
    """Package an accepted path ([batch, nodes] node indices, NO_NODE after counts) and the target token."""
    width = int(counts.max()) if counts.numel() else 0
    path = path[:, :width]
    path_tokens = torch.where(path != NO_NODE, tree.tokens.gather(1, path.clamp(min=0)),
                              torch.full_like(path, PAD_TOKEN))
    output_tokens = _output_tokens(path_tokens, counts, next_tokens)
    return TreeVerifyResult(accepted_counts=counts, output_tokens=output_tokens, accepted_nodes=path)


def verify_tree_greedy(
    target_logits: torch.Tensor,  # [batch, nodes + 1, vocab]: row 0 at the root (last committed token), j + 1 at node j
    tree: DraftTree,
) -> TreeVerifyResult:
    """Greedy tree verification: the longest path whose every token is the target's argmax after its parent.

    From the root, descend into the first child in drawn order (the first try, then the later siblings)
    whose token equals the target's argmax at the current node; stop where none does and emit that argmax
    (recovered, or bonus at a leaf). The output equals greedy decoding with the target alone (SpecInfer,
    Miao et al. 2024).
    """
    _check_tree(target_logits, tree, "target_logits")
    device = target_logits.device
    batch, nodes = tree.tokens.shape
    rows = torch.arange(batch, device=device)
    argmax = target_logits.argmax(dim=-1)  # [batch, nodes + 1]
    # A node matches when its token is the argmax at its parent (row parent + 1).
    matches = tree.valid & (tree.tokens == argmax.gather(1, tree.parents + 1))  # [batch, nodes]
    node_ids = torch.arange(nodes, device=device)[None, :]
    current = torch.full((batch,), ROOT_PARENT, dtype=torch.long, device=device)  # the root
    counts = torch.zeros(batch, dtype=torch.long, device=device)
    path = torch.full((batch, nodes), NO_NODE, dtype=torch.long, device=device)
    for _ in range(nodes):
        # First drawn (lowest index) matching child of the current node, or none.
        candidates = matches & (tree.parents == current[:, None])
        found = candidates.any(dim=1)
        if not found.any():
            break
        child = torch.where(candidates, node_ids, nodes).min(dim=1).values
        path[rows[found], counts[found]] = child[found]
        counts = counts + found.long()
        current = torch.where(found, child, current)
    return _tree_result(tree, path, counts, argmax[rows, current + 1])


def verify_tree(
    target_probs: torch.Tensor,  # [batch, nodes + 1, vocab]: row 0 at the root (last committed token), j + 1 at node j
    tree: DraftTree,
    uniforms: torch.Tensor,  # [batch, nodes + 1] in [0, 1)
) -> TreeVerifyResult:
    """Lossless tree verification by recursive rejection sampling (RSD, Jeon et al. 2024, algorithm 1;
    SpecInfer's multi-step speculative sampling, Miao et al. 2024).

    At the current node (first the root) with target distribution p_1 = p, try its children x_1, x_2,
    ... in the order they were drawn (x_1 the first try, the others later siblings): accept x_i (node j)
    iff uniforms[:, j] < min(1, p_i(x_i) / q_i(x_i)), where q_i = ``tree.draft_probs`` at x_i (the
    distribution x_i was drawn from given the earlier siblings; see `DraftTree`). On acceptance descend
    into x_i with p = target_probs at x_i; on rejection p_{i+1} = norm(max(0, p_i - q_i)) (kept as p_i if
    that has zero mass, which only float rounding can cause). When the current node has no child left the
    step ends with a token sampled from the current p, the recovered token after a rejection or the bonus
    token at a leaf, with uniforms[:, nodes] through `sample_from_probs`. Whatever the tree, the emitted tokens are
    distributed exactly as tokens sampled from the target one by one. On a chain (one child per node)
    this is `verify_chain`, uniform for uniform.
    """
    _check_tree(target_probs, tree, "target_probs")
    batch, nodes = tree.tokens.shape
    if tree.vocab_size != target_probs.shape[2]:
        raise ValueError(f"tree.draft_probs has {tree.vocab_size} tokens, target_probs {target_probs.shape[2]}")
    if uniforms.shape != (batch, nodes + 1):
        raise ValueError(f"uniforms must be [batch, nodes + 1] = [{batch}, {nodes + 1}], "
                         f"got shape {tuple(uniforms.shape)}")
    device = target_probs.device
    uniforms = uniforms.to(device=device, dtype=torch.float64)
    first_child, next_sibling = sibling_links(tree)
    rows = torch.arange(batch, device=device)

    residual = target_probs[:, 0].double()  # [batch, vocab]: p_i at the current node
    candidate = first_child[:, 0].clone()  # [batch]: the next child to try, NO_NODE when none is left
    counts = torch.zeros(batch, dtype=torch.long, device=device)
    path = torch.full((batch, nodes), NO_NODE, dtype=torch.long, device=device)
    # Each node is tried at most once, so nodes rounds settle every row.
    for _ in range(nodes):
        trying = candidate != NO_NODE
        if not trying.any():
            break
        r, node = rows[trying], candidate[trying]
        token = tree.tokens[r, node]
        draft_q = tree.draft_probs[r, node].double()  # [t, vocab]
        p_x = residual[r, token]
        # u < min(1, p/q)  <=>  u * q < p  (u < 1), without dividing by q.
        accept = uniforms[r, node] * draft_q[torch.arange(len(r), device=device), token] < p_x

        rejected_residual = (residual[r] - draft_q).clamp(min=0.0)
        mass = rejected_residual.sum(dim=-1, keepdim=True)
        rejected_residual = torch.where(mass > 0, rejected_residual / mass.clamp(min=1e-300), residual[r])
        residual[r] = torch.where(accept[:, None], target_probs[r, node + 1].double(), rejected_residual)

        path[r[accept], counts[r[accept]]] = node[accept]
        counts[r] += accept.long()
        candidate[r] = torch.where(accept, first_child[r, node + 1], next_sibling[r, node])
    next_tokens = sample_from_probs(residual, uniforms[:, nodes])
    return _tree_result(tree, path, counts, next_tokens)
