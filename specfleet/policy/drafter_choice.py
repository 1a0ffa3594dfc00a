"""Each sequence's drafter, with several draft pools: which pool drafts for it this step, and how deep.

A fleet may run draft pools of different kinds at once (an n-gram lookup that is nearly free and right on
repetitive edits, and a `sparse_self` draft whose cost does not grow with the context). Each sequence has its own
acceptance with each drafter, and each drafter its own measured costs (its `CostModel`; the target's and the
router's are shared). A step calls every pool that has sequences in parallel, so it is priced as

    overhead(B, max d) + max over pools p of draft_p(n_p, max d in p) + target(B, 1 + verified drafts / B),

with n_p the sequences drafting in pool p, and its goodput is the expected tokens emitted over that time.

The search: each pool's own best depth plan for the whole batch (`throughput_plan`, exact for one drafter), then
the plan that gives each sequence the pool where that pool's plan expects the most tokens of it, then coordinate
ascent from the best of those (each sequence in turn tries every pool and depth, the others held), until no move
gains. Near-optimal rather than exact (the cross-check against brute force is in the tests), and cheap: B x pools x
depths evaluations a pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from specfleet.policy.acceptance import expected_emitted
from specfleet.policy.costs import CostModel, context_bucket, context_note, mean_context, verified_drafts
from specfleet.policy.depths import DepthProblem, throughput_plan
from specfleet.policy.hurdle import HeldBack, apply_hurdle, calibration_note, check_hurdle

MAX_PASSES = 4
"""Coordinate ascent's passes over the batch; it settles in one or two."""


@dataclass(frozen=True)
class PoolOption:
    """One draft pool as the policy sees it for one step: its costs, and per sequence of the batch the acceptance
    and offer rates with its drafter and the depth it can draft there (0: it cannot, e.g. the pool has no replica
    available for it)."""

    name: str
    costs: CostModel
    alphas: Sequence[float]
    offer_rates: Sequence[float]
    limits: Sequence[int]


@dataclass(frozen=True)
class PoolDecision:
    """Each sequence's pool and depth for one step, the predictions behind them, and why."""

    pools: tuple[str, ...]
    """Per sequence, the pool it drafts from (its first pool's name when its depth is 0)."""
    depths: tuple[int, ...]
    goodput: float
    """Predicted tokens per second."""
    step_ms: float
    single_pool_goodput: tuple[tuple[str, float], ...]
    """Each pool's best plan for the whole batch alone, and plain decoding ("none"): what the choice beat."""
    held_back: HeldBack | None = None
    calibration: float = 1.0
    pinned: bool = False
    """The depth was fixed (``--depth K``): only the pools were chosen."""
    context: int | None = None

    @cached_property
    def reason(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """One line: how many sequences each pool drafts for and how deep, against each pool alone."""
        if not self.depths:
            return "no sequences"
        parts = []
        for pool in dict.fromkeys(p for p, d in zip(self.pools, self.depths, strict=True) if d > 0):
            depths = [d for p, d in zip(self.pools, self.depths, strict=True) if p == pool and d > 0]
            span = f"depth {depths[0]}" if min(depths) == max(depths) else f"depths {min(depths)}-{max(depths)}"
            parts.append(f"{pool} x{len(depths)} {span}")
        plain = sum(d == 0 for d in self.depths)
        if plain:
            parts.append(f"plain x{plain}")
        others = ", ".join(f"{name}: {g:.0f}" for name, g in self.single_pool_goodput)
        head = "pinned " if self.pinned else ""
        reason = f"{head}drafters {', '.join(parts)} ({self.goodput:.0f} tok/s) vs all on one: {others}"
        if self.held_back is not None:
            reason += self.held_back.note("drafting")
        if max(self.depths) > 0:
            reason += calibration_note(self.calibration)
        return reason + context_note(self.context)


def mixed_step_ms(options: Sequence[PoolOption], pools: Sequence[int], depths: Sequence[int],
                  contexts: Sequence[int] | None = None) -> float:
    """Predicted ms of a step where sequence i drafts ``depths[i]`` tokens from ``options[pools[i]]`` (see the
    module's formula). The target and overhead come from the first option's cost model: every pool's model shares
    those roles' fits."""
    return _Tally(_Pricer(options, contexts), list(pools), list(depths)).step_ms()


def mixed_goodput(options: Sequence[PoolOption], pools: Sequence[int], depths: Sequence[int],
                  contexts: Sequence[int] | None = None) -> float:
    """Predicted tokens per second of a mixed plan."""
    return _Tally(_Pricer(options, contexts), list(pools), list(depths)).goodput()


class _Pricer:
    """What pricing one step's mixed plans (`_Tally`) memoises across the search's many evaluations: each
    sequence's expected tokens by pool and depth, and each pool's draft cost by (sequences, depth, context)."""

    def __init__(self, options: Sequence[PoolOption], contexts: Sequence[int] | None) -> None:
        self.options = options
        self.contexts = contexts
        self.batch = len(options[0].alphas)
        self.context = mean_context(contexts, self.batch)
        self._emitted: dict[tuple[int, int, int], float] = {}
        self._drafting: dict[tuple[int, int, int, float | None], float] = {}

    def emitted(self, pool: int, row: int, depth: int) -> float:
        key = (pool, row, depth)
        found = self._emitted.get(key)
        if found is None:
            option = self.options[pool]
            found = self._emitted[key] = expected_emitted(option.alphas[row], depth, option.offer_rates[row])
        return found

    def drafting_ms(self, pool: int, rows: int, depth: int, context: float | None) -> float:
        """Pool ``pool``'s Propose for ``rows`` sequences, ``depth`` deep, at their mean ``context``."""
        key = (pool, rows, depth, None if context is None else context_bucket(context))
        found = self._drafting.get(key)
        if found is None:
            found = self._drafting[key] = self.options[pool].costs.predict("draft", rows, float(depth), key[3])
        return found


def choose_pools(options: Sequence[PoolOption], max_depth: int, *, contexts: Sequence[int] | None = None,
                 min_gain: float = 0.0, calibration: float = 1.0, pinned: bool = False) -> PoolDecision:
    """Each sequence's pool and depth (at most its limit in that pool and ``max_depth``) maximising predicted
    goodput; plain decoding instead when the best plan's gain, scaled by ``calibration``, is under ``min_gain``
    (`specfleet.policy.hurdle`). ``pinned``: the depth is fixed (each sequence's limit, capped at ``max_depth``),
    and each sequence drafts from the pool that expects the most tokens of it at that depth."""
    check_hurdle(min_gain, calibration)
    if not options:
        raise ValueError("need at least one draft pool")
    batch = len(options[0].alphas)
    for option in options:
        if not len(option.alphas) == len(option.offer_rates) == len(option.limits) == batch:
            raise ValueError(f"pool {option.name}: need one alpha, offer rate and limit per sequence ({batch})")
    if batch == 0:
        return PoolDecision((), (), 0.0, 0.0, ())
    caps = [[max(0, min(int(limit), max_depth)) for limit in option.limits] for option in options]
    pricer = _Pricer(options, contexts)

    def goodput(plan: tuple[list[int], list[int]]) -> float:
        return _Tally(pricer, *plan).goodput()

    plain = ([0] * batch, [0] * batch)
    singles = [([p] * batch, _alone(option, cap, max_depth, contexts)) for p, (option, cap)
               in enumerate(zip(options, caps, strict=True))]
    # Each sequence where its pool's own plan expects the most of it (ties: the pool given first).
    best_single = [max(range(len(options)), key=lambda p, i=i: (pricer.emitted(p, i, singles[p][1][i]), -p))
                   for i in range(batch)]
    mixed = (best_single, [singles[p][1][i] for i, p in enumerate(best_single)])
    if pinned:
        chosen = [max(range(len(options)), key=lambda p, i=i: (pricer.emitted(p, i, caps[p][i]), -p))
                  for i in range(batch)]
        best = (chosen, [caps[p][i] for i, p in enumerate(chosen)])
    else:
        best = _ascend(pricer, caps, max([plain, *singles, mixed], key=goodput))
    best_goodput, plain_goodput = goodput(best), goodput(plain)
    held = None
    if max(best[1]) > 0 and not pinned:
        held = apply_hurdle(best_goodput / plain_goodput, min_gain, calibration, tuple(best[1]))
        if held is not None:
            best, best_goodput = plain, plain_goodput
    names = tuple(options[p].name for p in best[0])
    single_goodput = (*((option.name, goodput(single)) for option, single in zip(options, singles, strict=True)),
                      ("none", plain_goodput))
    context = mean_context(contexts, batch)
    return PoolDecision(names, tuple(best[1]), best_goodput, _Tally(pricer, *best).step_ms(),
                        single_goodput, held, calibration, pinned,
                        None if context is None else options[0].costs.step_costs(batch, 0, context).context)


def _alone(option: PoolOption, caps: Sequence[int], max_depth: int, contexts: Sequence[int] | None) -> list[int]:
    """The pool's best depths for the whole batch, as if it were the only one."""
    problem = DepthProblem.of(option.alphas, option.costs, max_depth, caps, option.offer_rates, contexts)
    return [0] * len(caps) if problem is None else throughput_plan(problem)


def _ascend(pricer: _Pricer, caps: list[list[int]], start: tuple[list[int], list[int]]
            ) -> tuple[list[int], list[int]]:
    """Coordinate ascent: each sequence in turn takes the pool and depth that most raise the plan's goodput, the
    others held; then each pool's sequences together go one deeper or shallower, or over to another pool (a pool's
    deepest sequence sets its draft cost, so a single move can miss what a joint one gains). Until a pass moves
    nothing (or `MAX_PASSES`). Each try is priced incrementally (`_Tally`)."""
    tally = _Tally(pricer, *start)
    current = tally.goodput()
    pool_count = len(caps)
    for _ in range(MAX_PASSES):
        moved = False
        for i in range(pricer.batch):
            here = (tally.pools[i], tally.depths[i])
            for p, cap in enumerate(caps):
                for d in range(cap[i] + 1):
                    if (p, d) == here or (d == 0 and p != here[0]):
                        continue
                    tally.move(i, p, d)
                    score = tally.goodput()
                    if score > current * (1 + 1e-12):
                        current, here, moved = score, (p, d), True
            tally.move(i, *here)
        for p in range(pool_count):
            group = [i for i in range(pricer.batch) if tally.pools[i] == p and tally.depths[i] > 0]
            if not group:
                continue
            joint = [[(p, min(tally.depths[i] + 1, caps[p][i])) for i in group],
                     [(p, tally.depths[i] - 1) for i in group],
                     *([(q, min(tally.depths[i], caps[q][i])) for i in group] for q in range(pool_count) if q != p)]
            for targets in joint:
                before = [(tally.pools[i], tally.depths[i]) for i in group]
                for i, (q, d) in zip(group, targets, strict=True):
                    tally.move(i, q, d)
                score = tally.goodput()
                if score > current * (1 + 1e-12):
                    current, moved = score, True
                    break
                for i, (q, d) in zip(group, before, strict=True):
                    tally.move(i, q, d)
        if not moved:
            break
    return tally.pools, tally.depths


class _Tally:
    """A mixed plan with the sums its price needs kept up to date, so that moving one sequence and pricing the
    result costs O(pools x depth), not O(batch): per pool, how many of its sequences draft at each depth and their
    summed contexts; over the batch, expected tokens, verified drafts and offer rates."""

    def __init__(self, pricer: _Pricer, pools: list[int], depths: list[int]) -> None:
        self.pricer = pricer
        self.pools, self.depths = list(pools), list(depths)
        size = 1 + max([0, *depths, *(limit for option in pricer.options for limit in option.limits)])
        self.at_depth = [[0] * size for _ in pricer.options]  # [pool][depth]: sequences drafting that deep there
        self.context_sum = [0.0] * len(pricer.options)
        self.emitted = self.drafts = self.rates = 0.0
        for i in range(pricer.batch):
            self._add(i, 1)

    def _add(self, i: int, sign: int) -> None:
        pricer, p, d = self.pricer, self.pools[i], self.depths[i]
        rate = pricer.options[p].offer_rates[i]
        self.emitted += sign * pricer.emitted(p, i, d)
        self.drafts += sign * rate * d
        self.rates += sign * rate
        if d > 0:
            self.at_depth[p][d] += sign
            if pricer.contexts is not None:
                self.context_sum[p] += sign * pricer.contexts[i]

    def move(self, i: int, pool: int, depth: int) -> None:
        self._add(i, -1)
        self.pools[i], self.depths[i] = pool, depth
        self._add(i, 1)

    def step_ms(self) -> float:
        """The plan's predicted ms (the module's formula)."""
        pricer = self.pricer
        deepest, drafting = 0, 0.0
        for p, counts in enumerate(self.at_depth):
            rows = sum(counts)
            if rows:
                top = max(d for d, n in enumerate(counts) if n)
                deepest = max(deepest, top)
                context = None if pricer.contexts is None else self.context_sum[p] / rows
                drafting = max(drafting, pricer.drafting_ms(p, rows, top, context))
        shared = pricer.options[0].costs.step_costs(pricer.batch, deepest, pricer.context)
        verify = shared.target_at(verified_drafts(self.drafts, deepest * self.rates))
        return drafting + verify + shared.overhead_ms[deepest]

    def goodput(self) -> float:
        """The plan's predicted tokens per second."""
        return 1000.0 * self.emitted / self.step_ms()
