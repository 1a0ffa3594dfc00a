"""The acceptance model: each sequence's acceptance rate alpha and offer rate m, and what a step emits.

Rates are maximum-likelihood estimates from a sequence's own counts, shrunk toward the fleet's so that a new
sequence starts at the fleet rate (`acceptance_estimate`, `offer_estimate`); a chain's first draft position has a
rate of its own (`position_acceptance`). In a draft tree, a node's first
child is its *first try*, accepted at alpha as a chain's draft is; each *later sibling*, tried only after its
elders were rejected, has a rate of its own, beta (`tree_expected_emitted`).
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_ALPHA = 0.999
"""Acceptance estimates are capped below 1 so a lucky streak never makes unbounded depth look free."""
MIN_OFFER_RATE = 1e-3
"""Offer rates are kept above 0: the depth search ranks draft tokens by gain per expected verified token."""


def acceptance_estimate(accepted: int, rejections: int, prior_alpha: float, prior_weight: float) -> float:
    """A sequence's per-token acceptance rate alpha, shrunk toward the fleet-wide rate.

    `accepted`: draft tokens accepted so far; `rejections`: steps that ended in a rejected draft token.
    Returns (accepted + w * prior) / (accepted + rejections + w), clamped to [0, MAX_ALPHA].
    """
    # Why accepted / (accepted + rejections): if each draft token is accepted independently with
    # probability alpha, a step of depth d accepts a = min(G, d) tokens with G geometric, so its
    # likelihood is alpha^a * (1 - alpha) when a rejection ended it and alpha^d when all d were accepted.
    # Over many steps the log-likelihood is accepted * log(alpha) + rejections * log(1 - alpha), maximised
    # at accepted / (accepted + rejections). accepted / proposed is biased low at larger depth: the tokens
    # drafted after a rejection are never tested but still count as proposed. The prior acts as w
    # pseudo-observations at the fleet rate, so a new sequence starts there and moves as evidence comes.
    if accepted < 0 or rejections < 0:
        raise ValueError(f"accepted and rejections must be >= 0, got {accepted}, {rejections}")
    return min(max(_shrunk_rate(accepted, rejections, prior_alpha, prior_weight), 0.0), MAX_ALPHA)


def position_acceptance(accepted: int, rejections: int, first_accepted: int, first_tried: int, prior_alpha: float,
                        prior_weight: float) -> tuple[float, float]:
    """A sequence's acceptance at the first draft position and at the later ones: (alpha_1, alpha).

    A chain's first draft is tried in every step that drafted (``first_tried``, ``first_accepted`` of them
    accepted); a later draft only after all before it were accepted. The two rates differ where the drafter is
    surer of its first token than of the rest (a SPACE target's masks: the first mask sits next to what it saw) or
    the other way round (prompt lookup: a matched span goes on). Each is shrunk toward the sequence's pooled rate
    (`acceptance_estimate` of all its counts toward ``prior_alpha``), so without evidence on one position they are
    that rate, and the model is the i.i.d. one.
    """
    if not 0 <= first_accepted <= first_tried:
        raise ValueError(f"need 0 <= first_accepted <= first_tried, got {first_accepted}, {first_tried}")
    pooled = acceptance_estimate(accepted, rejections, prior_alpha, prior_weight)
    if first_tried == 0:  # nothing counted by position (or nothing drafted yet): one rate
        return pooled, pooled
    first_rejected = first_tried - first_accepted
    first = acceptance_estimate(first_accepted, first_rejected, pooled, prior_weight)
    later = acceptance_estimate(max(accepted - first_accepted, 0), max(rejections - first_rejected, 0), pooled,
                                prior_weight)
    return first, later


def _shrunk_rate(successes: int, failures: int, prior: float, prior_weight: float) -> float:
    """successes / (successes + failures), with ``prior_weight`` pseudo-observations at ``prior``."""
    if prior_weight < 0:
        raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
    total = successes + failures + prior_weight
    return (successes + prior_weight * prior) / total if total > 0 else prior


def offer_estimate(offers: int, misses: int, prior_rate: float, prior_weight: float) -> float:
    """A sequence's offer rate m: the chance that its drafter offers a draft when asked, shrunk toward the fleet's.

    `offers`: steps in which the drafter offered at least one token; `misses`: steps in which it was asked and
    offered none. Returns (offers + w * prior) / (offers + misses + w), clamped to [MIN_OFFER_RATE, 1].
    """
    if offers < 0 or misses < 0:
        raise ValueError(f"offers and misses must be >= 0, got {offers}, {misses}")
    return min(max(_shrunk_rate(offers, misses, prior_rate, prior_weight), MIN_OFFER_RATE), 1.0)


def expected_emitted(alpha: float, depth: int, offer_rate: float = 1.0, first_alpha: float | None = None) -> float:
    """Expected tokens one step emits at depth `depth`: accepted drafts plus the recovered or bonus token.

    sum_{k=0..depth} alpha^k = (1 - alpha^(depth + 1)) / (1 - alpha) under i.i.d. acceptance (Leviathan et
    al., 2023); depth 0 is plain decoding: 1. With an offer rate m < 1 the drafts come only in a fraction m
    of the steps: 1 + m * sum_{k=1..depth} alpha^k. With a first position of its own (`first_alpha`, alpha_1;
    see `position_acceptance`): 1 + m * alpha_1 * sum_{k=0..depth-1} alpha^k.
    """
    first = alpha if first_alpha is None else first_alpha
    for name, rate in (("alpha", alpha), ("first_alpha", first)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    if not 0.0 <= offer_rate <= 1.0:
        raise ValueError(f"offer_rate must be in [0, 1], got {offer_rate}")
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    if depth == 0:
        return 1.0
    later = float(depth - 1) if alpha == 1.0 else (alpha - alpha ** depth) / (1.0 - alpha)
    return 1.0 + offer_rate * first * (1.0 + later)


def checked_offer_rates(offer_rates: Sequence[float] | None, batch: int) -> list[float]:
    """Given offer rates, checked (one per sequence, each in (0, 1]); all 1 when not given."""
    if offer_rates is None:
        return [1.0] * batch
    rates = [float(m) for m in offer_rates]
    if len(rates) != batch:
        raise ValueError(f"offer_rates must have one entry per sequence ({batch}), got {len(rates)}")
    if any(not 0.0 < m <= 1.0 for m in rates):
        raise ValueError(f"offer rates must be in (0, 1], got {rates}")
    return rates


def checked_first_alphas(first_alphas: Sequence[float] | None, alphas: Sequence[float]) -> list[float]:
    """Given first-position rates, checked (one per sequence, each in [0, 1]); the alphas when not given."""
    if first_alphas is None:
        return list(alphas)
    firsts = [float(a) for a in first_alphas]
    if len(firsts) != len(alphas):
        raise ValueError(f"first_alphas must have one entry per sequence ({len(alphas)}), got {len(firsts)}")
    if any(not 0.0 <= a <= 1.0 for a in firsts):
        raise ValueError(f"first alphas must be in [0, 1], got {firsts}")
    return firsts


def tree_expected_emitted(alpha: float, tries: Sequence[int], later_sibling_alpha: float | None = None) -> float:
    """Expected tokens a step emits with a tree: 1 + sum_L prod_{l <= L} (1 - (1 - alpha)(1 - beta)^(tries[l] - 1)).

    `tries[l]`: the candidates recursive rejection tries at level l below the accepted path. The first try at a
    node is accepted with the sequence's per-token rate alpha, as a chain's draft is; each later sibling with
    ``later_sibling_alpha`` beta (alpha when not given). Later siblings are accepted well below alpha (measured in
    bench/tree_anatomy.md), so the router measures beta apart. An approximation still: levels are independent, and
    the rates do not depend on depth or on which sibling it is. For a chain (every tries[l] = 1) it is
    `expected_emitted` exactly.
    """
    beta = alpha if later_sibling_alpha is None else later_sibling_alpha
    for name, rate in (("alpha", alpha), ("later_sibling_alpha", beta)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    total, reach = 1.0, 1.0
    for b in tries:
        reach *= 1.0 - (1.0 - alpha) * (1.0 - beta) ** (b - 1)
        total += reach
    return total
