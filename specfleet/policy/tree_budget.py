"""Draft trees in the policy: the node budget per step, priced like a chain with as many tokens.

The verify cost of a tree is that of a chain with as many nodes (one forward over every node), so at small
batch, where extra tokens are nearly free, wide trees win, and at large batch chains or plain decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from specfleet.policy.costs import MIN_STEP_MS, CostModel, verified_drafts
from specfleet.policy.depths import checked_offer_rates, held_back_note


@dataclass(frozen=True)
class TreePlan:
    """What one sequence drafts in a step, as the policy sees it: ``nodes`` draft tokens in all, and the
    candidates recursive rejection tries at each level below the accepted path (``tries[l]``: the accepted
    node's children at depth l; a chain of depth d is nodes d, tries (1,) * d; nothing is nodes 0, tries ())."""

    nodes: int
    tries: tuple[int, ...]

    @property
    def levels(self) -> int:
        return len(self.tries)


def tree_expected_emitted(alpha: float, tries: Sequence[int], sibling_alpha: float | None = None) -> float:
    """Expected tokens a step emits with a tree: 1 + sum_L prod_{l <= L} (1 - (1 - alpha)(1 - beta)^(tries[l] - 1)).

    The first child tried at a node is accepted with the sequence's per-token rate alpha, as a chain's draft is;
    each later sibling, tried only after its elders were rejected, with ``sibling_alpha`` beta (alpha when not
    given). Measured with Qwen2.5-Coder-0.5B drafting for 1.5B (`python -m bench.tree_anatomy`), later siblings
    are accepted well below alpha (0.29-0.35 against first tries' 0.63-0.81 on ShareGPT prompts), so the router
    measures beta apart. An approximation still: levels are independent, and the rates do not depend on depth or
    on which sibling it is. For a chain (every tries[l] = 1) it is `expected_emitted` exactly.
    """
    beta = alpha if sibling_alpha is None else sibling_alpha
    for name, rate in (("alpha", alpha), ("sibling_alpha", beta)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    total, reach = 1.0, 1.0
    for b in tries:
        reach *= 1.0 - (1.0 - alpha) * (1.0 - beta) ** (b - 1)
        total += reach
    return total


@dataclass(frozen=True)
class TreeDecision:
    """The plan chosen for one step (``index`` into the candidates) and its predictions."""

    index: int
    goodput: float
    step_ms: float
    reason: str


def choose_tree_plan(alphas: Sequence[float], costs: CostModel, candidates: Sequence[Sequence[TreePlan]],
                     offer_rates: Sequence[float] | None = None, min_gain: float = 0.0,
                     calibration: float = 1.0, sibling_alphas: Sequence[float] | None = None) -> TreeDecision:
    """The candidate (one `TreePlan` per sequence; the batch drafts one shape, fitted to each sequence's
    room) maximising predicted goodput, with offer rates m_i (all 1 when not given) and later siblings' rates
    beta_i (alpha_i when not given):

        sum_i (1 + m_i (tree_expected_emitted(alpha_i, tries_i, beta_i) - 1)) / (draft_ms(B, max levels) [if any] +
                                                                    target_ms(B, 1 + mean m * nodes [+ padding]) +
                                                                    overhead_ms(B, max levels)).

    The verify cost of a tree is that of a chain with as many tokens (one forward over every node), so
    at small batch, where extra tokens are nearly free, wide trees win, and at large batch chains or
    plain decoding. Ties go to the earlier candidate (list cheaper ones first). A candidate that drafts nothing
    wins unless the best beats it by `min_gain` (see `DRAFT_HURDLE`), its gain first scaled by `calibration` (as
    in `choose_depths`).
    """
    if not candidates:
        raise ValueError("need at least one candidate plan")
    if min_gain < 0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")
    if not calibration > 0:
        raise ValueError(f"calibration must be > 0, got {calibration}")
    batch = len(alphas)
    rates = checked_offer_rates(offer_rates, batch)
    betas = list(alphas) if sibling_alphas is None else list(sibling_alphas)
    if len(betas) != batch:
        raise ValueError(f"sibling_alphas must have one entry per sequence ({batch}), got {len(betas)}")
    best: TreeDecision | None = None
    scores, steps = [], []
    for index, plans in enumerate(candidates):
        if len(plans) != batch:
            raise ValueError(f"candidate {index} has {len(plans)} plans for {batch} sequences")
        if batch == 0:
            return TreeDecision(index, 0.0, 0.0, "no sequences")
        levels = max(p.levels for p in plans)
        draft = costs.predict("draft", batch, float(levels)) if levels else 0.0
        verified = verified_drafts(sum(m * p.nodes for m, p in zip(rates, plans, strict=True)),
                                   max(p.nodes for p in plans) * sum(rates))
        step = (draft + costs.predict("target", batch, 1 + verified / batch)
                + max(MIN_STEP_MS, costs.predict("overhead", batch, 1.0 + levels)))
        emitted = sum(1 + m * (tree_expected_emitted(a, p.tries, beta) - 1)
                      for a, beta, m, p in zip(alphas, betas, rates, plans, strict=True))
        goodput = 1000.0 * emitted / step
        scores.append(goodput)
        steps.append(step)
        if best is None or goodput > best.goodput * (1 + 1e-12):
            best = TreeDecision(index, goodput, step, "")
    assert best is not None
    hurdle = ""
    plain = next((i for i, plans in enumerate(candidates) if not any(p.nodes for p in plans)), None)
    if plain is not None and best.index != plain and calibration * best.goodput < (1 + min_gain) * scores[plain]:
        hurdle = held_back_note("the best", calibration * best.goodput / scores[plain] - 1, min_gain, calibration)
        best = TreeDecision(plain, scores[plain], steps[plain], "")
    mean_nodes = sum(p.nodes for p in candidates[best.index]) / batch
    others = ", ".join(f"{sum(p.nodes for p in plans) / batch:.0f}: {g:.0f}"
                       for plans, g in zip(candidates, scores, strict=True) if plans is not candidates[best.index])
    reason = f"tree budget {mean_nodes:.1f} nodes ({best.goodput:.0f} tok/s) vs {others or 'nothing else'}{hurdle}"
    if best.index != plain and calibration != 1.0:
        reason += f"; gain x{calibration:.2f} as drafting steps measured"
    return TreeDecision(best.index, best.goodput, best.step_ms, reason)
