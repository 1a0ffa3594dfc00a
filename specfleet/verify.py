"""Verification of draft tokens against the target model: greedy, and lossless chain rejection sampling.

Plain functions on tensors, vectorised over a batch of sequences with ragged draft lengths. Every step
emits the accepted draft tokens plus exactly one token from the target: the *recovered* token (sampled
from the residual after a rejection) or the *bonus* token (when every draft token was accepted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specfleet.sampling import sample_from_probs


@dataclass
class VerifyResult:
    """Outcome of one verification step for a batch of sequences."""

    accepted_counts: torch.Tensor
    """[batch] int64: how many draft tokens were accepted (0..draft_len)."""
    output_tokens: torch.Tensor
    """[batch, depth + 1] int64: the accepted draft tokens, then the recovered or bonus token; -1 after it."""

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
    """Accepted drafts, then the recovered or bonus token at index accepted_count, then -1."""
    batch, depth = draft_tokens.shape
    positions = torch.arange(depth + 1, device=draft_tokens.device)[None, :]  # [1, depth + 1]
    padded = torch.cat([draft_tokens.long(), next_tokens.long()[:, None]], dim=1)  # [batch, depth + 1]
    counts = accepted_counts[:, None]
    out = torch.where(positions < counts, padded, torch.full_like(padded, -1))
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
        output_positions <= accepted_counts[:, None], target_tokens, torch.full_like(target_tokens, -1)
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
