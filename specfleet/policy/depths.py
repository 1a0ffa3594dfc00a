"""Depth plans: predicted goodput and time per token of a plan, and the search for the best depths.

A plan gives each live sequence a depth for one step. `choose_depths` maximises predicted goodput (expected
tokens emitted over predicted step time), `choose_depths_for_latency` minimises time per output token above
a goodput floor, `pinned_decision` reports the predictions for a fixed depth. Drafting must beat plain
decoding by `min_gain` (see `DRAFT_HURDLE`) to be chosen.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress, repeat
from operator import add, mul, sub, truediv

from specfleet.policy.acceptance import expected_emitted
from specfleet.policy.costs import CostModel, StepCosts

DRAFT_HURDLE = 0.1
"""The smallest predicted gain over plain decoding for which the router's policy drafts at all (`min_gain`).
A prediction is a fit of noisy timings: where drafting is predicted to gain a few percent, the gain is within
the model's error and the real sign can be either. Measured on the CPU with SmolLM2-135M and the n-gram
drafter (`python -m bench.adaptive`): at batch 16 and 32 plans predicted 3-10% above plain decoding ran
10-25% below it, while at batch 1-4, where drafting pays, the median predicted gain was 14-25%. It also holds
back some plans that would have gained (at batch 4, predicted 2-10%, measured 7-9%): a fixed margin cannot tell
where the model is optimistic from where it is right. The router therefore scales the predicted gain by how its own
drafting steps at that batch size measured against their predictions (the `calibration` argument) before it
applies the hurdle."""


def plan_step_ms(costs: CostModel, depths: Sequence[int], offer_rates: Sequence[float] | None = None) -> float:
    """Predicted ms of a step: draft at the largest depth (if any), target at 1 + the mean expected draft
    tokens offered (depth times offer rate) plus the padding charge of `verified_drafts`, overhead; read off
    `StepCosts`, as the depth search does."""
    batch = len(depths)
    if batch == 0:
        return 0.0
    deepest = max(depths)
    rates = checked_offer_rates(offer_rates, batch)
    return costs.step_costs(batch, deepest).step_ms(deepest, sum(map(mul, rates, depths)), deepest * sum(rates))


def plan_goodput(alphas: Sequence[float], depths: Sequence[int], costs: CostModel,
                 offer_rates: Sequence[float] | None = None) -> float:
    """Predicted tokens per second of a plan: expected tokens emitted over predicted step time."""
    rates = _check_plan(alphas, depths, offer_rates)
    if not depths:
        return 0.0
    return 1000.0 * sum(map(expected_emitted, alphas, depths, rates)) / plan_step_ms(costs, depths, rates)


def plan_time_per_token(alphas: Sequence[float], depths: Sequence[int], costs: CostModel,
                        offer_rates: Sequence[float] | None = None) -> float:
    """Predicted ms per output token, averaged over the sequences: mean_i(step_ms / expected_emitted_i)."""
    rates = _check_plan(alphas, depths, offer_rates)
    if not depths:
        return 0.0
    step = plan_step_ms(costs, depths, rates)
    return step * sum(1.0 / expected_emitted(a, d, m) for a, d, m in zip(alphas, depths, rates, strict=True)
                      ) / len(depths)


def _check_plan(alphas: Sequence[float], depths: Sequence[int], offer_rates: Sequence[float] | None
                ) -> Sequence[float]:
    """Validates a plan; its offer rates (all 1 when not given)."""
    if len(alphas) != len(depths):
        raise ValueError(f"alphas and depths must have the same length, got {len(alphas)} and {len(depths)}")
    if any(d < 0 for d in depths):
        raise ValueError(f"depths must be >= 0, got {list(depths)}")
    return checked_offer_rates(offer_rates, len(alphas))


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


@dataclass(frozen=True)
class DepthDecision:
    """The depths for one step and the predictions behind them (for logs and metrics)."""

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
    reason: str
    """One human-readable line: the choice against the uniform alternatives."""


class _Margins:
    """Per-sequence expected tokens by depth, and the marginal gain of each extra draft token.

    Item (k, i) is sequence i's k-th draft token, k = 1..limit_i, listed k-major. Its throughput gain is
    m_i * alpha_i^k (expected emitted rises by that much); its latency gain is 1/E_i(k-1) - 1/E_i(k); its
    weight is m_i, the draft tokens it adds to the verification on average. Gains per weight fall as k
    grows (E is concave and increasing), which makes the greedy allocations below exact when the weights
    are equal (every drafter always offers, or all offer alike).
    """

    def __init__(self, alphas: Sequence[float], limits: Sequence[int], max_depth: int, latency: bool,
                 offer_rates: Sequence[float]) -> None:
        batch = len(alphas)
        everyone = list(range(batch))
        power, emitted = list(offer_rates), [1.0] * batch  # power: m_i * alpha_i^k
        self.emitted_by_depth = [emitted]  # [depth][sequence]: E_i(depth), depth capped by the sequence's limit
        self.unit_weights = all(m == 1.0 for m in offer_rates)  # n drafts verify n tokens: the table's own grid
        self.seq: list[int] = []
        self.k: list[int] = []
        self.gain: list[float] = []
        self.weight: list[float] = []
        self.latency_gain: list[float] = []
        prev_latency = [math.inf] * batch
        for k in range(1, max_depth + 1):
            power = list(map(mul, power, alphas))
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
            if latency:
                # Running min: rounding must never make a later token look better than an earlier one.
                prev_latency = [min(1.0 / e - 1.0 / g, prev)
                                for e, g, prev in zip(emitted, grown, prev_latency, strict=True)]
                self.latency_gain.extend(prev_latency[i] for i in live)
            emitted = grown
            self.emitted_by_depth.append(emitted)


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
    plain = steps.step_ms(0, 0)
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
            fixed = steps.draft_ms[cap] + steps.overhead_ms[cap]
            totals: Iterable[float]
            if margins.unit_weights:
                totals = range(1, count + 1)
            else:  # the verified total after each item: the summed expected drafts so far
                sel_weights = weights if cap == max_depth else compress(weights, map(cap.__ge__, ks))
                totals = accumulate(sel_weights)
            step = map(fixed.__add__, steps.padded_targets(totals, cap * offered))
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


def _uniform_depths(limits: Sequence[int], depth: int) -> list[int]:
    return [min(depth, lim) for lim in limits]


def _decide(alphas: Sequence[float], costs: CostModel, max_depth: int, limits: Sequence[int] | None,
            latency: bool, min_goodput: float, uniform: bool, pinned: int | None,
            offer_rates: Sequence[float] | None, min_gain: float = 0.0, calibration: float = 1.0) -> DepthDecision:
    alphas = [float(a) for a in alphas]
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"alphas must be in [0, 1], got {alphas}")
    rates = checked_offer_rates(offer_rates, len(alphas))
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    if min_goodput < 0:
        raise ValueError(f"min_goodput must be >= 0, got {min_goodput}")
    if min_gain < 0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")
    if not calibration > 0:
        raise ValueError(f"calibration must be > 0, got {calibration}")
    batch = len(alphas)
    if batch == 0:
        return DepthDecision((), 0.0, 0.0, 0.0, (0.0,) * (max_depth + 1), "no sequences")
    caps = [max_depth] * batch if limits is None else [min(max(int(lim), 0), max_depth) for lim in limits]
    if len(caps) != batch:
        raise ValueError(f"limits must have one entry per sequence ({batch}), got {len(caps)}")

    steps = costs.step_costs(batch, max_depth)
    margins = _Margins(alphas, caps, max_depth, latency and not uniform and pinned is None, rates)

    offered = sum(rates)

    def evaluate(depths: Sequence[int]) -> tuple[float, float, float]:
        """(goodput tok/s, step ms, mean ms per token) from the precomputed step costs."""
        deepest = max(depths)
        step = steps.step_ms(deepest, sum(map(mul, rates, depths)), deepest * offered)
        emitted = [margins.emitted_by_depth[d][i] for i, d in enumerate(depths)]
        return 1000.0 * sum(emitted) / step, step, step * sum(1.0 / e for e in emitted) / batch

    def uniform_goodput_at(depth: int) -> float:
        """As `evaluate` for everyone at `depth` (capped), read straight off the expected-tokens table."""
        total = sum(map(mul, rates, map(min, caps, repeat(depth))))
        widest = min(depth, deepest)
        return 1000.0 * sum(margins.emitted_by_depth[depth]) / steps.step_ms(widest, total, widest * offered)

    deepest = max(caps)
    uniform_goodput = tuple(map(uniform_goodput_at, range(max_depth + 1)))
    floor_met = True
    if pinned is not None:
        depths = _uniform_depths(caps, pinned)
    elif uniform:
        # The best single depth: throughput maximises goodput; latency minimises time per token above the floor.
        best_goodput = max(range(max_depth + 1), key=lambda d: (uniform_goodput[d], -d))
        if latency:
            ok = [d for d in range(max_depth + 1) if uniform_goodput[d] >= min_goodput]
            floor_met = bool(ok)
            chosen = min(ok, key=lambda d: (evaluate(_uniform_depths(caps, d))[2], d)) if ok else best_goodput
        else:
            chosen = best_goodput
        depths = _uniform_depths(caps, chosen)
    else:
        by_gain = _ranked(margins.gain, margins.weight)
        if not latency:
            found, _ = _search(margins, [by_gain], steps, max_depth, offered, False, 0.0)
            depths = _allocate(margins, by_gain, batch, found.cap, found.total)
        else:
            # First the unconstrained optimum (exact); if it meets the floor it is the answer.
            by_latency = _ranked(margins.latency_gain, margins.weight)
            found, _ = _search(margins, [by_latency], steps, max_depth, offered, True, 0.0)
            depths = _allocate(margins, by_latency, batch, found.cap, found.total)
            if min_goodput > 0 and evaluate(depths)[0] < min_goodput:
                # The floor binds: search the latency-greedy and goodput-greedy allocations with the floor
                # checked per allocation; the goodput-optimal plan, which meets the floor whenever any plan
                # does, is among them. If none meets it: the throughput-maximising plan.
                orders = [by_latency, by_gain]
                found, floor_met = _search(margins, orders, steps, max_depth, offered, True, min_goodput)
                if not floor_met:
                    orders = [by_gain]
                    found, _ = _search(margins, orders, steps, max_depth, offered, False, 0.0)
                depths = _allocate(margins, orders[found.order], batch, found.cap, found.total)

    goodput, step, per_token = evaluate(depths)
    hurdle = ""
    if pinned is None and (min_gain > 0 or calibration != 1.0) and any(depths):
        plain = [0] * batch
        plain_goodput, plain_step, plain_per_token = evaluate(plain)
        # Latency mode compares time per token, but keeps a drafting plan that plain decoding's goodput can't match.
        gain = calibration * (plain_per_token / per_token if latency else goodput / plain_goodput) - 1
        if gain < min_gain and (not latency or plain_goodput >= min_goodput):
            hurdle = held_back_note(_depth_span(depths), gain, min_gain, calibration)
            depths, goodput, step, per_token = plain, plain_goodput, plain_step, plain_per_token
    reason = _reason(depths, goodput, uniform_goodput, pinned is not None) + hurdle
    if pinned is None and any(depths) and calibration != 1.0:
        reason += f"; gain x{calibration:.2f} as drafting steps measured"
    if latency and pinned is None:
        reason += f"; {per_token:.1f} ms/token per sequence"
        if min_goodput > 0:
            reason += f", floor {min_goodput:.0f} tok/s " + ("met" if floor_met else "unreachable: best goodput plan")
    return DepthDecision(tuple(depths), goodput, step, per_token, uniform_goodput, reason)


def _depth_span(depths: Sequence[int]) -> str:
    """"depth 3" for one depth, "depths 1-4" for a spread."""
    lo, hi = min(depths), max(depths)
    return f"depth {lo}" if lo == hi else f"depths {lo}-{hi}"


def held_back_note(what: str, gain: float, min_gain: float, calibration: float = 1.0) -> str:
    """The reason's note when plain decoding wins because drafting's predicted gain is under the hurdle."""
    measured = "" if calibration == 1.0 else f" (x{calibration:.2f} as drafting steps measured)"
    return f"; {what} would gain {gain:.0%}{measured}, under the {min_gain:.0%} hurdle"


def _reason(depths: Sequence[int], goodput: float, uniform_goodput: Sequence[float], pinned: bool) -> str:
    lo, hi = min(depths), max(depths)
    if lo == hi:
        head = f"{'pinned ' if pinned else ''}{_depth_span(depths)} ({goodput:.0f} tok/s) vs "
        others = ", ".join(f"{d}: {g:.0f}" for d, g in enumerate(uniform_goodput) if d != lo)
    else:
        head = f"{_depth_span(depths)} (mean {sum(depths) / len(depths):.1f}, {goodput:.0f} tok/s) vs uniform "
        others = ", ".join(f"{d}: {g:.0f}" for d, g in enumerate(uniform_goodput))
    return head + (others or "nothing else")


def choose_depths(alphas: Sequence[float], costs: CostModel, max_depth: int, *,
                  limits: Sequence[int] | None = None, uniform: bool = False,
                  offer_rates: Sequence[float] | None = None, min_gain: float = 0.0,
                  calibration: float = 1.0) -> DepthDecision:
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
    relative to plain ones (see `router.prediction_audit.Calibration`; 1: as predicted).
    """
    return _decide(alphas, costs, max_depth, limits, False, 0.0, uniform, None, offer_rates, min_gain, calibration)


def choose_depths_for_latency(alphas: Sequence[float], costs: CostModel, max_depth: int, min_goodput: float = 0.0,
                              *, limits: Sequence[int] | None = None, uniform: bool = False,
                              offer_rates: Sequence[float] | None = None, min_gain: float = 0.0,
                              calibration: float = 1.0) -> DepthDecision:
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
    meets the floor); `calibration` as in `choose_depths`.
    """
    return _decide(alphas, costs, max_depth, limits, True, min_goodput, uniform, None, offer_rates, min_gain,
                   calibration)


def pinned_decision(alphas: Sequence[float], costs: CostModel, depth: int, *, max_depth: int = 0,
                    limits: Sequence[int] | None = None, offer_rates: Sequence[float] | None = None
                    ) -> DepthDecision:
    """Every sequence at `depth` (capped by `limits`), with uniform predictions up to max(depth, max_depth)."""
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    return _decide(alphas, costs, max(depth, max_depth), limits, False, 0.0, True, depth, offer_rates)
