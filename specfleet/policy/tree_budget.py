"""Draft trees in the policy: the node budget per step, priced like a chain with as many tokens.

The verify cost of a tree is that of a chain with as many nodes (one forward over every node), so at small
batch, where extra tokens are nearly free, wide trees win, and at large batch chains or plain decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from operator import mul

from specfleet.policy.acceptance import checked_offer_rates, tree_expected_emitted
from specfleet.policy.costs import CostModel, context_note, mean_context, price_step
from specfleet.policy.hurdle import HeldBack, apply_hurdle, calibration_note, check_hurdle


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


@dataclass(frozen=True)
class TreeDecision:
    """The plan chosen for one step (``index`` into the candidates), its predictions, and what `describe` needs
    to say why."""

    index: int
    goodput: float
    """Predicted tokens per second of the chosen candidate."""
    step_ms: float
    """Predicted ms of the step."""
    budgets: tuple[float, ...] = ()
    """Each candidate's mean nodes per sequence (empty: no sequences)."""
    goodputs: tuple[float, ...] = ()
    """Each candidate's predicted tokens per second."""
    held_back: HeldBack | None = None
    """Set when the best candidate gave way to the one that drafts nothing, its gain under the hurdle."""
    calibration: float = 1.0
    """The factor drafting's predicted gain was scaled by before the hurdle (1: as predicted)."""
    context: int | None = None
    """The batch's mean KV length per sequence the step was priced at (rounded up); None: not given."""

    @cached_property
    def reason(self) -> str:
        """`describe()`, written once."""
        return self.describe()

    def describe(self) -> str:
        """One human-readable line: the chosen budget against the other candidates, and why."""
        if not self.budgets:
            return "no sequences"
        others = ", ".join(f"{nodes:.0f}: {g:.0f}" for i, (nodes, g) in enumerate(zip(self.budgets, self.goodputs,
                                                                                        strict=True))
                           if i != self.index)
        mean_nodes = self.budgets[self.index]
        reason = f"tree budget {mean_nodes:.1f} nodes ({self.goodput:.0f} tok/s) vs {others or 'nothing else'}"
        if self.held_back is not None:
            reason += self.held_back.note("the best")
        if mean_nodes > 0:
            reason += calibration_note(self.calibration)
        return reason + context_note(self.context)


def choose_tree_plan(alphas: Sequence[float], costs: CostModel, candidates: Sequence[Sequence[TreePlan]],
                     offer_rates: Sequence[float] | None = None, min_gain: float = 0.0,
                     calibration: float = 1.0, later_sibling_alphas: Sequence[float] | None = None,
                     contexts: Sequence[int] | None = None) -> TreeDecision:
    """The candidate (one `TreePlan` per sequence; the batch drafts one shape, fitted to each sequence's
    room) maximising predicted goodput, with offer rates m_i (all 1 when not given) and later siblings' rates
    beta_i (alpha_i when not given):

        sum_i (1 + m_i (tree_expected_emitted(alpha_i, tries_i, beta_i) - 1)) / price_step(max levels,
                                                                                    sum_i m_i * nodes_i [+ padding]),

    priced as `price_step` prices a depth plan: a tree of n nodes as a chain of n tokens. Ties go to the earlier
    candidate (list cheaper ones first). A candidate that drafts nothing wins unless the best beats it by
    `min_gain` (see `DRAFT_HURDLE`), its gain first scaled by `calibration` (as in `choose_depths`). `contexts`:
    each sequence's KV length, priced at their mean as `choose_depths` prices them (None: the reference context).
    """
    if not candidates:
        raise ValueError("need at least one candidate plan")
    check_hurdle(min_gain, calibration)
    batch = len(alphas)
    rates = checked_offer_rates(offer_rates, batch)
    betas = list(alphas) if later_sibling_alphas is None else list(later_sibling_alphas)
    if len(betas) != batch:
        raise ValueError(f"later_sibling_alphas must have one entry per sequence ({batch}), got {len(betas)}")
    for index, plans in enumerate(candidates):
        if len(plans) != batch:
            raise ValueError(f"candidate {index} has {len(plans)} plans for {batch} sequences")
    if batch == 0:
        return TreeDecision(0, 0.0, 0.0)
    shapes = [([p.nodes for p in plans], max(p.levels for p in plans)) for plans in candidates]
    steps = costs.step_costs(batch, max(max(*nodes, levels) for nodes, levels in shapes), mean_context(contexts, batch))
    offered = sum(rates)
    goodputs, steps_ms = [], []
    best = 0
    for plans, (nodes, levels) in zip(candidates, shapes, strict=True):
        step = price_step(steps, levels, sum(map(mul, rates, nodes)), max(nodes) * offered)
        emitted = sum(1 + m * (tree_expected_emitted(a, p.tries, beta) - 1)
                      for a, beta, m, p in zip(alphas, betas, rates, plans, strict=True))
        goodputs.append(1000.0 * emitted / step)
        steps_ms.append(step)
        if goodputs[-1] > goodputs[best] * (1 + 1e-12):
            best = len(goodputs) - 1
    held = None
    plain = next((i for i, plans in enumerate(candidates) if not any(p.nodes for p in plans)), None)
    if plain is not None and best != plain:
        held = apply_hurdle(goodputs[best] / goodputs[plain], min_gain, calibration)
        if held is not None:
            best = plain
    budgets = tuple(sum(nodes) / batch for nodes, _ in shapes)
    return TreeDecision(best, goodputs[best], steps_ms[best], budgets, tuple(goodputs), held, calibration,
                        steps.context)
