"""Depth plans: predicted goodput and time per token of a plan, and the searches for the best depths.

A plan gives each live sequence a depth for one step. Each search is a function of one step's `DepthProblem`
(acceptance and offer rates, depth caps, step costs) that returns a plan: `throughput_plan` maximises predicted
goodput (expected tokens emitted over predicted step time), `latency_plan` minimises time per output token above a
goodput floor, `uniform_plan` and `uniform_latency_plan` do the same with one depth for the whole batch, and
`pinned_plan` is a fixed depth. The entry points (`choose_depths`, `choose_depths_for_latency`, `pinned_decision`)
run one, let plain decoding take the place of a plan whose gain is under the hurdle (`apply_hurdle`), and return
a `DepthDecision`, whose `describe()` writes the reason.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate, compress, repeat
from operator import add, mul, sub, truediv
from typing import NamedTuple

from specfleet.policy.acceptance import checked_first_alphas, checked_offer_rates, expected_emitted
from specfleet.policy.costs import (
    AheadOverlap,
    CostModel,
    StepCosts,
    context_note,
    mean_context,
    price_step,
    verified_drafts,
)
from specfleet.policy.hurdle import HeldBack, apply_hurdle, calibration_note, check_hurdle


def plan_step_ms(costs: CostModel, depths: Sequence[int], offer_rates: Sequence[float] | None = None,
                 contexts: Sequence[int] | None = None) -> float:
    """Predicted ms of a step (`price_step`): draft at the largest depth (if any), target at 1 + the mean expected
    draft tokens offered (depth times offer rate) plus the padding charge, overhead, each at the batch's mean
    context (`contexts`: each sequence's KV length; None: the reference context); as the depth search prices it."""
    batch = len(depths)
    if batch == 0:
        return 0.0
    deepest = max(depths)
    rates = checked_offer_rates(offer_rates, batch)
    steps = costs.step_costs(batch, deepest, mean_context(contexts, batch))
    return price_step(steps, deepest, sum(map(mul, rates, depths)), deepest * sum(rates))


def plan_goodput(alphas: Sequence[float], depths: Sequence[int], costs: CostModel,
                 offer_rates: Sequence[float] | None = None, contexts: Sequence[int] | None = None,
                 first_alphas: Sequence[float] | None = None) -> float:
    """Predicted tokens per second of a plan: expected tokens emitted over predicted step time. ``first_alphas``:
    each sequence's acceptance at the first draft position (`position_acceptance`; None: its alpha)."""
    rates, firsts = _check_plan(alphas, depths, offer_rates, first_alphas)
    if not depths:
        return 0.0
    return 1000.0 * sum(map(expected_emitted, alphas, depths, rates, firsts)) / plan_step_ms(costs, depths, rates,
                                                                                             contexts)


def plan_time_per_token(alphas: Sequence[float], depths: Sequence[int], costs: CostModel,
                        offer_rates: Sequence[float] | None = None, contexts: Sequence[int] | None = None,
                        first_alphas: Sequence[float] | None = None) -> float:
    """Predicted ms per output token, averaged over the sequences: mean_i(step_ms / expected_emitted_i)."""
    rates, firsts = _check_plan(alphas, depths, offer_rates, first_alphas)
    if not depths:
        return 0.0
    step = plan_step_ms(costs, depths, rates, contexts)
    return step * sum(1.0 / expected_emitted(*args) for args in zip(alphas, depths, rates, firsts, strict=True)
                      ) / len(depths)


def _check_plan(alphas: Sequence[float], depths: Sequence[int], offer_rates: Sequence[float] | None,
                first_alphas: Sequence[float] | None) -> tuple[Sequence[float], Sequence[float]]:
    """Validates a plan; its offer rates (all 1 when not given) and first-position rates (alphas when not given)."""
    if len(alphas) != len(depths):
        raise ValueError(f"alphas and depths must have the same length, got {len(alphas)} and {len(depths)}")
    if any(d < 0 for d in depths):
        raise ValueError(f"depths must be >= 0, got {list(depths)}")
    return checked_offer_rates(offer_rates, len(alphas)), checked_first_alphas(first_alphas, alphas)


class DepthPlan(NamedTuple):
    """Depths for one step and what they are predicted to do (the leading fields of a `DepthDecision`)."""

    depths: tuple[int, ...]
    """Per sequence, in the order given."""
    goodput: float
    """Predicted tokens per second."""
    step_ms: float
    """Predicted ms of the step."""
    time_per_token_ms: float
    """Predicted ms per output token, averaged over the sequences."""


@dataclass(frozen=True)
class DepthDecision:
    """The depths for one step, the predictions behind them, and what `describe` needs to say why."""

    depths: tuple[int, ...]
    """Per sequence, in the order given."""
    goodput: float
    """Predicted tokens per second of this plan."""
    step_ms: float
    """Predicted ms of the step."""
    time_per_token_ms: float
    """Predicted ms per output token, averaged over the sequences."""
    uniform_goodput: tuple[float, ...]
    """Predicted tokens per second if every sequence used depth d, for d = 0..max_depth."""
    mode: str = "throughput"
    """What the depths were chosen for: "throughput", "latency" or "pinned" (a fixed depth)."""
    min_goodput: float = 0.0
    """Latency mode's goodput floor in tokens/s (0: none)."""
    floor_met: bool = True
    """Latency mode: whether any plan reaches the floor (if none does, these are the best-goodput depths)."""
    held_back: HeldBack | None = None
    """The drafting plan that gave way to plain decoding (these depths), its gain under the hurdle; None if none."""
    calibration: float = 1.0
    """The factor drafting's predicted gain was scaled by before the hurdle (1: as predicted)."""
    overlap: AheadOverlap | None = None
    """Drafting ahead: the chosen plan's draft made ahead and the verify it overlaps, as priced (None: not drafting
    ahead, or nothing drafted)."""
    context: int | None = None
    """The batch's mean KV length per sequence the step was priced at (rounded up, `context_bucket`); None: not
    given, each role's reference context."""

    @cached_property
    def reason(self) -> str:
        """`describe()`, written once."""
        return self.describe()

    def describe(self) -> str:
        """One human-readable line: the choice against the uniform alternatives, and why."""
        depths = self.depths
        if not depths:
            return "no sequences"
        lo, hi = min(depths), max(depths)
        if lo == hi:
            head = f"{'pinned ' if self.mode == 'pinned' else ''}{_depth_span(depths)} ({self.goodput:.0f} tok/s) vs "
            others = ", ".join(f"{d}: {g:.0f}" for d, g in enumerate(self.uniform_goodput) if d != lo)
        else:
            head = f"{_depth_span(depths)} (mean {sum(depths) / len(depths):.1f}, {self.goodput:.0f} tok/s) vs uniform "
            others = ", ".join(f"{d}: {g:.0f}" for d, g in enumerate(self.uniform_goodput))
        reason = head + (others or "nothing else")
        if self.held_back is not None:
            reason += self.held_back.note(_depth_span(self.held_back.depths))
        if hi > 0:
            reason += calibration_note(self.calibration) + ahead_note(self.overlap, hi)
        reason += context_note(self.context)
        if self.mode == "latency":
            reason += f"; {self.time_per_token_ms:.1f} ms/token per sequence"
            if self.min_goodput > 0:
                reason += f", floor {self.min_goodput:.0f} tok/s " + ("met" if self.floor_met
                                                                     else "unreachable: best goodput plan")
        return reason


def ahead_note(overlap: AheadOverlap | None, deepest: int) -> str:
    """Drafting ahead, how the plan's drafts made ahead fit beside the verify they overlap (what sizes them: a deeper
    draft that outlasts the verify makes the step wait for it, and on the target's own cores the two slow each
    other); "" otherwise."""
    if overlap is None:
        return ""
    ahead, verify, contention = overlap.ahead_ms, overlap.verify_ms, overlap.contention
    if contention == 0.0:
        return (f"; drafting {deepest + 1} ahead takes {ahead:.1f} ms, {'within' if ahead <= verify else 'past'} the "
                f"{verify:.1f} ms verify")
    priced = "one after the other" if contention >= 1.0 else f"the longer plus {contention:.0%} of the shorter"
    return (f"; drafting {deepest + 1} ahead takes {ahead:.1f} ms beside the {verify:.1f} ms verify, on the target's "
            f"CPU cores: priced {priced}")


def _depth_span(depths: Sequence[int]) -> str:
    """"depth 3" for one depth, "depths 1-4" for a spread."""
    lo, hi = min(depths), max(depths)
    return f"depth {lo}" if lo == hi else f"depths {lo}-{hi}"


class _Margins:
    """Per-sequence expected tokens by depth, and the marginal gain of each extra draft token.

    Item (k, i) is sequence i's k-th draft token, k = 1..limit_i, listed k-major. Its throughput gain is
    m_i * alpha_1,i * alpha_i^(k-1) (expected emitted rises by that much; alpha_1,i is the first position's rate,
    `position_acceptance`); its latency gain is 1/E_i(k-1) - 1/E_i(k); its weight is m_i, the draft tokens it adds
    to the verification on average. Gains per weight fall as k grows (E is concave and increasing, whatever the
    first position's rate), which makes the greedy allocations below exact when the weights are equal (every
    drafter always offers, or all offer alike).
    """

    def __init__(self, alphas: Sequence[float], limits: Sequence[int], max_depth: int,
                 offer_rates: Sequence[float], first_alphas: Sequence[float]) -> None:
        batch = len(alphas)
        everyone = list(range(batch))
        power, emitted = list(offer_rates), [1.0] * batch  # power: m_i * alpha_1,i * alpha_i^(k-1)
        self.emitted_by_depth = [emitted]  # [depth][sequence]: E_i(depth), depth capped by the sequence's limit
        self.unit_weights = all(m == 1.0 for m in offer_rates)  # n drafts verify n tokens: the table's own grid
        self.seq: list[int] = []
        self.k: list[int] = []
        self.gain: list[float] = []
        self.weight: list[float] = []
        for k in range(1, max_depth + 1):
            power = list(map(mul, power, first_alphas if k == 1 else alphas))
            live = [i for i in everyone if limits[i] >= k]
            if len(live) == batch:
                grown = list(map(add, emitted, power))
                self.gain.extend(power)
                self.weight.extend(offer_rates)
            else:
                grown = [e + p if k <= lim else e for e, p, lim in zip(emitted, power, limits, strict=True)]
                self.gain.extend(power[i] for i in live)
                self.weight.extend(offer_rates[i] for i in live)
            self.seq.extend(live)
            self.k.extend([k] * len(live))
            emitted = grown
            self.emitted_by_depth.append(emitted)

    @cached_property
    def latency_gain(self) -> list[float]:
        """Each item's latency gain, in the items' order (worked out when a latency search first asks)."""
        gains: list[float] = []
        running = [math.inf] * len(self.emitted_by_depth[0])
        start = 0
        for k in range(1, len(self.emitted_by_depth)):
            # Running min: rounding must never make a later token look better than an earlier one.
            running = [min(1.0 / e - 1.0 / g, prev) for e, g, prev
                       in zip(self.emitted_by_depth[k - 1], self.emitted_by_depth[k], running, strict=True)]
            end = bisect_right(self.k, k, start)
            gains.extend(map(running.__getitem__, self.seq[start:end]))
            start = end
        return gains


def _ranked(gains: list[float], weights: list[float]) -> list[int]:
    """Item indices by falling gain per weight (the knapsack's ratio rule)."""
    # Python's sort is stable even with reverse=True: equal ratios keep their k-major order, so within one
    # sequence its k-th token always comes before its (k+1)-th and every prefix is a valid plan.
    ratios = list(map(truediv, gains, weights))
    return sorted(range(len(gains)), key=ratios.__getitem__, reverse=True)


def _allocate(margins: _Margins, order: list[int], batch: int, cap: int, total: int) -> list[int]:
    """Depths from taking the first `total` items of `order` whose k is at most `cap`."""
    depths = [0] * batch
    taken = 0
    for j in order:
        if taken == total:
            break
        if margins.k[j] <= cap:
            depths[margins.seq[j]] += 1
            taken += 1
    return depths


@dataclass(frozen=True)
class _Candidate:
    cap: int
    total: int
    order: int  # index into the orders searched


def _search(margins: _Margins, orders: list[list[int]], steps: StepCosts, max_depth: int, offered: float,
            latency: bool, min_goodput: float) -> tuple[_Candidate, bool]:
    """Best (cap D, total drafts N, allocation order); True when the goodput floor is met.

    For a fixed cap D (the largest depth, which sets the draft cost) and total N (which sets the target
    cost), the step time is fixed, so the best plan maximises the summed gains: greedy by marginal gain
    is exact because each sequence's gains fall with depth. Enumerating D and N then gives the optimum.
    With unequal offer rates the target cost follows the expected verified tokens (the items' summed
    weights), the order is by gain per weight, and each prefix is the best plan for its own verified total
    (a knapsack solved greedily where the greedy fills it exactly); a plan in between prefixes can be a
    little better, so there the result is near-optimal rather than exact.
    The padding charge (`verified_drafts`) depends on D and N alone (`offered`: the summed offer rates, so
    D x offered is what everyone at depth D would verify), which keeps this exact.
    A plan whose actual largest depth is below D is charged D's draft cost and padding here, but the same
    plan is also found, correctly charged, under its own cap, so the maximum is still exact.
    Cost: one sort of B*D items, then O(B*D) work per cap, all of it inside C loops (map, compress,
    accumulate), so O(B*D^2) cheap steps rather than a heap per cap.
    """
    batch = steps.batch_size
    floor_per_ms = min_goodput / 1000.0
    plain = price_step(steps, 0, 0.0)
    feasible = batch >= floor_per_ms * plain
    # Score, maximised: throughput is tokens per ms; latency is minus the mean ms per token.
    best_score = (-plain if feasible else -math.inf) if latency else batch / plain
    best = _Candidate(0, 0, 0)
    for o, order in enumerate(orders):
        ks = [margins.k[j] for j in order]
        gains = [margins.gain[j] for j in order]
        weights = [] if margins.unit_weights else [margins.weight[j] for j in order]
        latency_gains = [margins.latency_gain[j] for j in order] if latency else []
        for cap in range(1, max_depth + 1):
            count = bisect_right(margins.k, cap)  # items with k <= cap (margins.k is k-major, so sorted)
            if count == 0:
                continue
            # At the largest cap every item qualifies; below it, keep those with k <= cap, in ranked order.
            sel = gains if cap == max_depth else compress(gains, map(cap.__ge__, ks))
            emitted = accumulate(sel, initial=float(batch))
            next(emitted)  # skip the zero-draft total: the n-th value is n drafts, as step below
            totals: Iterable[float]
            if margins.unit_weights:
                totals = range(1, count + 1)
            else:  # the verified total after each item: the summed expected drafts so far
                sel_weights = weights if cap == max_depth else compress(weights, map(cap.__ge__, ks))
                totals = accumulate(sel_weights)
            step = steps.step_times(cap, steps.padded_targets(totals, cap * offered))
            if not latency:
                scores = list(map(truediv, emitted, step))
                top = max(scores)
                at = scores.index(top)
            else:
                step = list(step)
                sel_latency = latency_gains if cap == max_depth else compress(latency_gains, map(cap.__ge__, ks))
                inverse = accumulate(sel_latency, sub, initial=float(batch))  # sum_i 1/E_i
                next(inverse)
                per_token = list(map(mul, step, inverse))  # batch x the mean ms per token
                low = min(per_token)
                at = per_token.index(low)
                if floor_per_ms > 0:
                    emitted = list(emitted)
                    if emitted[at] < floor_per_ms * step[at]:  # the floor binds: mask the plans below it
                        per_token = [t if e >= floor_per_ms * s else math.inf
                                     for t, s, e in zip(per_token, step, emitted, strict=True)]
                        low = min(per_token)
                        at = per_token.index(low)
                top = -low / batch
            # Ties go to the earlier candidate: smaller cap, fewer drafts (relative slack for rounding).
            if top > best_score and (best_score == -math.inf or top > best_score + 1e-12 * abs(best_score)):
                best_score, best, feasible = top, _Candidate(cap, at + 1, o), True
    return best, feasible


class DepthProblem:
    """One step's depth search, set up once for every search to read: each sequence's acceptance rate, offer
    rate and depth cap, the step costs at this batch size, each sequence's expected tokens by depth and the marginal
    gain of each draft token (`_Margins`), and the predicted goodput of each depth for all."""

    def __init__(self, alphas: Sequence[float], costs: CostModel, max_depth: int, caps: Sequence[int],
                 rates: Sequence[float], context: float | None = None,
                 first_alphas: Sequence[float] | None = None) -> None:
        """Checked inputs (see `of`), one or more sequences; `context`: their mean KV length (None: the reference);
        `first_alphas`: their acceptance at the first draft position (None: their alphas)."""
        self.size = len(alphas)
        self.max_depth = max_depth
        self.caps = caps
        self.rates = rates
        self.offered = sum(rates)  # what everyone at depth D verifies, over D
        self.deepest = max(caps)
        self.steps = costs.step_costs(self.size, max_depth, context)
        self.margins = _Margins(alphas, caps, max_depth, rates, alphas if first_alphas is None else first_alphas)
        self.uniform_goodput = tuple(map(self._uniform_goodput, range(max_depth + 1)))

    @classmethod
    def of(cls, alphas: Sequence[float], costs: CostModel, max_depth: int, limits: Sequence[int] | None = None,
           offer_rates: Sequence[float] | None = None, contexts: Sequence[int] | None = None,
           first_alphas: Sequence[float] | None = None) -> DepthProblem | None:
        """The problem for these sequences, checked; None when there are none. `limits` caps each sequence's depth
        (room left in the request or the caches), `offer_rates` are all 1 when not given, `contexts` are each
        sequence's KV length (None: each role's reference context), `first_alphas` each one's acceptance at the
        first draft position (None: its alpha, the i.i.d. model)."""
        alphas = [float(a) for a in alphas]
        if any(not 0.0 <= a <= 1.0 for a in alphas):
            raise ValueError(f"alphas must be in [0, 1], got {alphas}")
        rates = checked_offer_rates(offer_rates, len(alphas))
        firsts = checked_first_alphas(first_alphas, alphas)
        if max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {max_depth}")
        if not alphas:
            return None
        caps = [max_depth] * len(alphas) if limits is None else [min(max(int(lim), 0), max_depth) for lim in limits]
        if len(caps) != len(alphas):
            raise ValueError(f"limits must have one entry per sequence ({len(alphas)}), got {len(caps)}")
        return cls(alphas, costs, max_depth, caps, rates, mean_context(contexts, len(alphas)), firsts)

    def at_depth(self, depth: int) -> list[int]:
        """Everyone at `depth`, each capped by its own limit."""
        return [min(depth, cap) for cap in self.caps]

    def evaluate(self, depths: Sequence[int]) -> DepthPlan:
        """The plan's predictions, read off the precomputed step costs and expected tokens."""
        deepest = max(depths)
        step = price_step(self.steps, deepest, sum(map(mul, self.rates, depths)), deepest * self.offered)
        by_depth = self.margins.emitted_by_depth
        emitted = [by_depth[d][i] for i, d in enumerate(depths)]
        return DepthPlan(tuple(depths), 1000.0 * sum(emitted) / step, step,
                         step * sum(1.0 / e for e in emitted) / self.size)

    def overlap(self, depths: Sequence[int]) -> AheadOverlap | None:
        """Drafting ahead, the plan's draft made ahead and the verify beside it, as priced; None otherwise."""
        deepest = max(depths, default=0)
        verify = self.steps.target_at(verified_drafts(sum(map(mul, self.rates, depths)), deepest * self.offered))
        return self.steps.overlap(deepest, verify)

    def _uniform_goodput(self, depth: int) -> float:
        """`evaluate(at_depth(depth)).goodput`, read straight off the expected-tokens table."""
        total = sum(map(mul, self.rates, map(min, self.caps, repeat(depth))))
        widest = min(depth, self.deepest)
        return (1000.0 * sum(self.margins.emitted_by_depth[depth])
                / price_step(self.steps, widest, total, widest * self.offered))


# --- the searches: each returns a plan -------------------------------------------------------------------


def throughput_plan(problem: DepthProblem) -> list[int]:
    """Per-sequence depths maximising predicted goodput (see `choose_depths`)."""
    margins = problem.margins
    by_gain = _ranked(margins.gain, margins.weight)
    found, _ = _search(margins, [by_gain], problem.steps, problem.max_depth, problem.offered, False, 0.0)
    return _allocate(margins, by_gain, problem.size, found.cap, found.total)


def latency_plan(problem: DepthProblem, min_goodput: float) -> list[int] | None:
    """Per-sequence depths minimising predicted time per token among plans of at least `min_goodput` tokens/s;
    None when no plan reaches it (see `choose_depths_for_latency`)."""
    margins, steps, max_depth, offered = problem.margins, problem.steps, problem.max_depth, problem.offered
    # First the unconstrained optimum (exact); if it meets the floor it is the answer.
    by_latency = _ranked(margins.latency_gain, margins.weight)
    found, _ = _search(margins, [by_latency], steps, max_depth, offered, True, 0.0)
    depths = _allocate(margins, by_latency, problem.size, found.cap, found.total)
    if min_goodput <= 0 or problem.evaluate(depths).goodput >= min_goodput:
        return depths
    # The floor binds: search the latency-greedy and goodput-greedy allocations with the floor checked per
    # allocation; the goodput-optimal plan, which meets the floor whenever any plan does, is among them.
    orders = [by_latency, _ranked(margins.gain, margins.weight)]
    found, floor_met = _search(margins, orders, steps, max_depth, offered, True, min_goodput)
    return _allocate(margins, orders[found.order], problem.size, found.cap, found.total) if floor_met else None


def uniform_plan(problem: DepthProblem) -> list[int]:
    """One depth for the whole batch (each sequence capped by its limit): the best predicted goodput, the
    shallowest on a tie."""
    goodput = problem.uniform_goodput
    return problem.at_depth(max(range(problem.max_depth + 1), key=lambda d: (goodput[d], -d)))


def uniform_latency_plan(problem: DepthProblem, min_goodput: float) -> list[int] | None:
    """One depth for the whole batch: the least predicted time per token among depths of at least `min_goodput`
    tokens/s, the shallowest on a tie; None when no depth reaches it."""
    ok = [d for d, goodput in enumerate(problem.uniform_goodput) if goodput >= min_goodput]
    if not ok:
        return None
    return problem.at_depth(min(ok, key=lambda d: (problem.evaluate(problem.at_depth(d)).time_per_token_ms, d)))


def pinned_plan(problem: DepthProblem, depth: int) -> list[int]:
    """Everyone at `depth`, each capped by its limit, whatever the predictions say."""
    return problem.at_depth(depth)


# --- the entry points: a search, the hurdle, a decision ----------------------------------------------------


def _no_sequences(max_depth: int) -> DepthDecision:
    return DepthDecision((), 0.0, 0.0, 0.0, (0.0,) * (max_depth + 1))


def _with_hurdle(problem: DepthProblem, plan: DepthPlan, min_gain: float, calibration: float,
                 floor: float | None = None) -> tuple[DepthPlan, HeldBack | None]:
    """`plan`, or plain decoding in its place when the plan's predicted gain is under the hurdle (`apply_hurdle`).
    `floor`: latency mode's goodput floor, which plain decoding must meet to take the place (None: throughput
    mode, where the gain is in goodput rather than in time per token)."""
    if not any(plan.depths):
        return plan, None
    plain = problem.evaluate([0] * problem.size)
    if floor is None:
        advantage = plan.goodput / plain.goodput
    elif plain.goodput < floor:  # latency mode keeps a drafting plan that plain decoding's goodput can't match
        return plan, None
    else:
        advantage = plain.time_per_token_ms / plan.time_per_token_ms
    held = apply_hurdle(advantage, min_gain, calibration, plan.depths)
    return (plan, None) if held is None else (plain, held)


def choose_depths(alphas: Sequence[float], costs: CostModel, max_depth: int, *,
                  limits: Sequence[int] | None = None, uniform: bool = False,
                  offer_rates: Sequence[float] | None = None, min_gain: float = 0.0,
                  calibration: float = 1.0, contexts: Sequence[int] | None = None,
                  first_alphas: Sequence[float] | None = None) -> DepthDecision:
    """Throughput mode: per-sequence depths in [0, max_depth] maximising predicted goodput,

        sum_i expected_emitted(alpha_i, d_i, m_i) / (draft_ms(B, max d) [if max d > 0]
                                                     + target_ms(B, mean(1 + m * d) [+ padding])
                                                     + overhead_ms(B, max d)),

    where a plan with unequal depths pays `PADDING_SHARE` of the tokens padding every row to the widest.

    Exact when the offer rates m_i are equal (all 1 when not given), near-optimal otherwise (see `_search`).
    Depth 0 for everyone (plain decoding) is always a candidate. `limits` caps each sequence's depth (room
    left in the request or the caches); `uniform` restricts the search to one depth for the whole batch,
    for comparison. A plan predicted to beat plain decoding by less than `min_gain` (0.1: 10%) gives way to it
    (see `DRAFT_HURDLE`); the plain functions default to 0, the exact optimum. `calibration` scales drafting's
    predicted gain over plain decoding before that test: how far measured drafting steps beat their predictions,
    relative to plain ones (see `router.prediction_audit.Calibration`; 1: as predicted). `contexts`: each
    sequence's KV length; every role is priced at their mean (with the batch size, their sum: the KV a verify
    reads), so a long context makes the verify's fixed cost larger and deeper drafts cheaper by comparison (None:
    each role's reference context). `first_alphas`: each sequence's acceptance at the first draft position, where
    it differs from the later ones' alpha (`position_acceptance`; None: alpha, i.i.d.).
    """
    check_hurdle(min_gain, calibration)
    problem = DepthProblem.of(alphas, costs, max_depth, limits, offer_rates, contexts, first_alphas)
    if problem is None:
        return _no_sequences(max_depth)
    depths = uniform_plan(problem) if uniform else throughput_plan(problem)
    plan, held = _with_hurdle(problem, problem.evaluate(depths), min_gain, calibration)
    return DepthDecision(*plan, problem.uniform_goodput, held_back=held, calibration=calibration,
                         overlap=problem.overlap(plan.depths), context=problem.steps.context)


def choose_depths_for_latency(alphas: Sequence[float], costs: CostModel, max_depth: int, min_goodput: float = 0.0,
                              *, limits: Sequence[int] | None = None, uniform: bool = False,
                              offer_rates: Sequence[float] | None = None, min_gain: float = 0.0,
                              calibration: float = 1.0, contexts: Sequence[int] | None = None,
                              first_alphas: Sequence[float] | None = None) -> DepthDecision:
    """Latency mode: depths minimising the predicted time per output token, averaged over the sequences,

        step_ms * mean_i(1 / expected_emitted(alpha_i, d_i)),

    among plans whose goodput is at least `min_goodput` tokens/s; when no plan reaches it, the
    throughput-maximising plan. (Each sequence's own time per token is step_ms / E_i; the step time over
    the *mean* E_i would just be batch / goodput, the throughput objective again. Averaging per-sequence
    times weighs poorly-accepting sequences more: this mode drafts less for a good sequence when that
    slows every other sequence's tokens, and more for poorer ones where a little depth lifts them.)

    Exact (with equal offer rates), like throughput mode, when the unconstrained optimum meets the floor.
    When the floor binds,
    it is checked on each (cap, total) candidate's latency-greedy and goodput-greedy allocations: the
    result then meets the floor whenever any plan can and is never slower per token than the
    goodput-optimal plan, but a floor-bound optimum that is neither greedy allocation can be missed.
    With `min_gain`, plain decoding wins unless drafting cuts the time per token by that share (and plain decoding
    meets the floor); `calibration`, `contexts` and `first_alphas` as in `choose_depths`.
    """
    if min_goodput < 0:
        raise ValueError(f"min_goodput must be >= 0, got {min_goodput}")
    check_hurdle(min_gain, calibration)
    problem = DepthProblem.of(alphas, costs, max_depth, limits, offer_rates, contexts, first_alphas)
    if problem is None:
        return _no_sequences(max_depth)
    depths = uniform_latency_plan(problem, min_goodput) if uniform else latency_plan(problem, min_goodput)
    floor_met = depths is not None
    if depths is None:  # the floor is unreachable: the best goodput
        depths = uniform_plan(problem) if uniform else throughput_plan(problem)
    plan, held = _with_hurdle(problem, problem.evaluate(depths), min_gain, calibration, min_goodput)
    return DepthDecision(*plan, problem.uniform_goodput, mode="latency", min_goodput=min_goodput,
                         floor_met=floor_met, held_back=held, calibration=calibration,
                         overlap=problem.overlap(plan.depths), context=problem.steps.context)


def pinned_decision(alphas: Sequence[float], costs: CostModel, depth: int, *, max_depth: int = 0,
                    limits: Sequence[int] | None = None, offer_rates: Sequence[float] | None = None,
                    contexts: Sequence[int] | None = None, first_alphas: Sequence[float] | None = None
                    ) -> DepthDecision:
    """Every sequence at `depth` (capped by `limits`), with uniform predictions up to max(depth, max_depth)."""
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    problem = DepthProblem.of(alphas, costs, max(depth, max_depth), limits, offer_rates, contexts, first_alphas)
    if problem is None:
        return _no_sequences(max(depth, max_depth))
    depths = pinned_plan(problem, depth)
    return DepthDecision(*problem.evaluate(depths), problem.uniform_goodput, mode="pinned",
                         overlap=problem.overlap(depths), context=problem.steps.context)
