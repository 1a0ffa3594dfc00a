"""Sampling siblings without replacement: Gumbel-Top-k, the distribution each sibling was drawn from, and the
conditional Gumbel that makes a beam search sample without replacement (Kool et al. 2019, "Stochastic Beams
and Where to Find Them"; RSD, Jeon et al. 2024).

Perturbing every log-probability with independent Gumbel noise and ranking the results draws tokens without
replacement in that order, so a node's children are its first try and its later siblings in the order drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specfleet.trees.shapes import PAD_TOKEN


@dataclass
class GumbelTopK:
    """k tokens per row sampled without replacement, in the order drawn."""

    tokens: torch.Tensor
    """[m, k] int64: the k largest Gumbel-perturbed log-probabilities; PAD_TOKEN where the row has fewer than
    k tokens of nonzero probability."""
    perturbed: torch.Tensor
    """[m, k] float64: their perturbed log-probabilities, descending; -inf where tokens is PAD_TOKEN."""


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
    return GumbelTopK(torch.where(possible, tokens, torch.full_like(tokens, PAD_TOKEN)), values)


def without_replacement_probs(
    draft_probs: torch.Tensor,  # [m, vocab] the distribution the siblings were drawn from
    tokens: torch.Tensor,  # [m, k] int64 siblings in the order drawn, PAD_TOKEN for none
) -> torch.Tensor:  # [m, k, vocab] float32
    """The distribution each sibling was drawn from: q with the earlier siblings removed, renormalised.

    Entry [:, i] is q_i = q * 1[x not in x_1..x_{i-1}] / (1 - q(x_1) - ... - q(x_{i-1})), the q_i of
    RSD's recursive rejection sampling; rows for absent siblings (PAD_TOKEN) are zero.
    """
    if draft_probs.dim() != 2 or tokens.dim() != 2 or tokens.shape[0] != draft_probs.shape[0]:
        raise ValueError(f"need draft_probs [m, vocab] and tokens [m, k], got shapes "
                         f"{tuple(draft_probs.shape)} and {tuple(tokens.shape)}")
    m, k = tokens.shape
    present = tokens != PAD_TOKEN  # [m, k]
    drawn = torch.zeros(m, k, draft_probs.shape[1], dtype=torch.float64, device=draft_probs.device)
    drawn.scatter_(-1, tokens.clamp(min=0)[..., None], present[..., None].double())
    earlier = torch.cumsum(drawn, dim=1) - drawn  # [m, k, vocab]: 1 where an earlier sibling drew the token
    probs = draft_probs.double()[:, None, :] * (earlier == 0)
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return (probs * present[..., None]).float()


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
