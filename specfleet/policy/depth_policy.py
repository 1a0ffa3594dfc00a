"""The router's policy object: fitted costs and fleet acceptance in, depths (or a tree plan) per step out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from specfleet.policy.acceptance import MAX_ALPHA, acceptance_estimate, offer_estimate, position_acceptance
from specfleet.policy.catch_up import fit_prefill_rates
from specfleet.policy.costs import (
    DEFAULT_COSTS,
    CostFn,
    CostModel,
    CostSample,
    SelfDrafting,
    drafter_defaults,
)
from specfleet.policy.depths import DepthDecision, choose_depths, choose_depths_for_latency, pinned_decision
from specfleet.policy.drafter_choice import PoolDecision, PoolOption, choose_pools
from specfleet.policy.tree_budget import TreeDecision, TreePlan, choose_tree_plan

MODES = ("throughput", "latency")


@dataclass(frozen=True)
class _Fitted:
    costs: CostModel
    fleet_alpha: float
    fleet_offer_rate: float = 1.0
    fleet_later_sibling_alpha: float | None = None  # None until a tree's later sibling has been tried
    samples: tuple[CostSample, ...] = ()
    # Each drafter kind's acceptance, shrunk toward the fleet's: the prior of a sequence drafting with that kind.
    alpha_by_drafter: Mapping[str, float] = field(default_factory=dict)
    # Each drafter kind's offer rate, likewise.
    offer_rate_by_drafter: Mapping[str, float] = field(default_factory=dict)
    # Each drafter kind's model, fitted from its own draft samples (`DepthPolicy.costs_for`).
    by_drafter: dict[str, CostModel] = field(default_factory=dict, compare=False)
    by_self_drafting: dict[SelfDrafting, CostModel] = field(default_factory=dict, compare=False)
    # Each drafter kind's ms per prompt token it computes (`specfleet.policy.catch_up`), where measured.
    prefill_ms_per_token: Mapping[str, float] = field(default_factory=dict)

    def alpha_for(self, drafter: str | None) -> float:
        """The acceptance a sequence drafting with ``drafter`` starts from: its kind's, else the fleet's."""
        return self.fleet_alpha if drafter is None else self.alpha_by_drafter.get(drafter, self.fleet_alpha)

    def offer_rate_for(self, drafter: str | None) -> float:
        """The offer rate a sequence drafting with ``drafter`` starts from: its kind's, else the fleet's. Kinds differ
        most here: prompt lookup offers nothing where the context has no match, a model always offers."""
        if drafter is None:
            return self.fleet_offer_rate
        return self.offer_rate_by_drafter.get(drafter, self.fleet_offer_rate)


@dataclass(frozen=True)
class PoolCounts:
    """One draft pool as the planner gives it to `DepthPolicy.choose_pools`: its name and drafter kind, and per
    sequence of the batch its (accepted, rejections) and (offers, misses) with that pool and its depth room there."""

    name: str
    kind: str
    first_tries: Sequence[tuple[int, int]]
    offers: Sequence[tuple[int, int]]
    limits: Sequence[int]


class DepthPolicy:
    """The router's speculation-depth policy: fitted costs and fleet acceptance in, depths per step out.

    `update` (off the hot path, about once a second) refits from telemetry; `choose` (every step) turns
    each sequence's (accepted, rejections) and (offers, misses) counts into acceptance and offer-rate
    estimates and picks depths.
    Thread-safe without locks: `update` builds a new immutable state and swaps one reference, which
    Python assigns atomically, so `choose` sees either the old state or the new one, never a mix.
    """

    def __init__(self, max_depth: int, mode: str = "throughput", min_goodput: float = 0.0,
                 prior_weight: float = 8.0, default_alpha: float = 0.5, *, uniform: bool = False,
                 pinned_depth: int | None = None, defaults: Mapping[str, CostFn] | None = None,
                 min_gain: float = 0.0, drafts_ahead: bool = False) -> None:
        """
        max_depth: the deepest draft any sequence gets.
        mode: "throughput" (maximise goodput) or "latency" (minimise time per token above `min_goodput`).
        min_goodput: the latency mode's floor in tokens/s (0: none).
        prior_weight: how many observations the fleet-wide rate counts as in each sequence's estimate.
        default_alpha: the fleet-wide acceptance rate assumed before any has been measured.
        uniform: one depth for the whole batch instead of per sequence.
        pinned_depth: always this depth (as `--depth K`), still reporting predictions.
        defaults: cost functions per role used where there are no samples (DEFAULT_COSTS if None).
        min_gain: the predicted gain over plain decoding below which it decodes plainly (the router passes
            `DRAFT_HURDLE` unless told otherwise; 0: the exact optimum).
        drafts_ahead: the router drafts the next step while the target verifies (--draft-ahead): steps are priced
            with drafting overlapping the verify (`specfleet.policy.costs.StepCosts.step_times`).
        """
        if max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {max_depth}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if min_goodput < 0:
            raise ValueError(f"min_goodput must be >= 0, got {min_goodput}")
        if prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
        if not 0.0 <= default_alpha <= MAX_ALPHA:
            raise ValueError(f"default_alpha must be in [0, {MAX_ALPHA}], got {default_alpha}")
        if pinned_depth is not None and pinned_depth < 0:
            raise ValueError(f"pinned_depth must be >= 0, got {pinned_depth}")
        if min_gain < 0:
            raise ValueError(f"min_gain must be >= 0, got {min_gain}")
        self.max_depth = max_depth if pinned_depth is None else max(max_depth, pinned_depth)
        self.mode = mode
        self.min_goodput = min_goodput
        self.prior_weight = prior_weight
        self.default_alpha = default_alpha
        self.uniform = uniform
        self.pinned_depth = pinned_depth
        self.min_gain = min_gain
        self.drafts_ahead = drafts_ahead
        self.ahead_contention = 0.0  # see `set_ahead_contention`
        self._defaults = dict(DEFAULT_COSTS if defaults is None else defaults)
        self._state = _Fitted(CostModel(self._defaults, ahead_alpha=default_alpha if drafts_ahead else None),
                              default_alpha)

    @classmethod
    def fixed(cls, depth: int, *, defaults: Mapping[str, CostFn] | None = None,
              drafts_ahead: bool = False) -> DepthPolicy:
        """A policy that always answers `depth` (the `--depth K` setting); its predictions, which the router reports
        and audits, price a step as ``drafts_ahead`` says it runs."""
        return cls(max_depth=depth, pinned_depth=depth, defaults=defaults, drafts_ahead=drafts_ahead)

    @property
    def costs(self) -> CostModel:
        return self._state.costs

    @property
    def fleet_alpha(self) -> float:
        return self._state.fleet_alpha

    def fleet_alpha_for(self, drafter: str | None) -> float:
        """The acceptance prior of a sequence drafting with ``drafter`` (a kind): its kind's, else the fleet's."""
        return self._state.alpha_for(drafter)

    @property
    def fleet_offer_rate(self) -> float:
        return self._state.fleet_offer_rate

    def fleet_offer_rate_for(self, drafter: str | None) -> float:
        """The offer-rate prior of a sequence drafting with ``drafter`` (a kind): its kind's, else the fleet's."""
        return self._state.offer_rate_for(drafter)

    def update(self, samples: Iterable[CostSample], fleet_accepted: int, fleet_rejections: int,
               fleet_offers: int = 0, fleet_misses: int = 0, fleet_later_siblings_accepted: int = 0,
               fleet_later_siblings_rejected: int = 0,
               drafter_first_tries: Mapping[str, tuple[int, int]] | None = None,
               drafter_offers: Mapping[str, tuple[int, int]] | None = None) -> None:
        """Refit from the recent window of cost samples (the whole window, each time) and the fleet's
        acceptance and offer counts: ``fleet_accepted``/``fleet_rejections`` of first tries (every draft of a
        chain), ``fleet_later_siblings_*`` of trees' later siblings; ``drafter_first_tries``: the (accepted,
        rejected) first tries of each drafter kind, whose rate (shrunk toward the fleet's) is the prior of the
        sequences drafting with that kind, so a Redis shared by pools of several kinds does not lend one kind
        another's acceptance; ``drafter_offers``: each kind's (offers, misses), the same for its offer rate. An
        empty window means the defaults; when telemetry cannot be read, skip the call and the last model stays.

        The drafter kinds and self-drafting targets the last model was asked about (`costs_for`,
        `self_drafted_costs`) are fitted here too, so a caller that refits in a worker thread leaves the step path
        no fitting to do. Safe beside `choose` in another thread: the new model replaces the old in one swap."""
        alpha = acceptance_estimate(fleet_accepted, fleet_rejections, self.default_alpha, self.prior_weight)
        samples = tuple(samples)
        costs = CostModel.fit(samples, self._defaults, max_tokens=max(33, self.max_depth + 2),
                              ahead_alpha=alpha if self.drafts_ahead else None,
                              ahead_contention=self.ahead_contention)
        offer_rate = offer_estimate(fleet_offers, fleet_misses, 1.0, self.prior_weight)
        later_sibling_alpha = None
        if fleet_later_siblings_accepted + fleet_later_siblings_rejected:
            later_sibling_alpha = acceptance_estimate(fleet_later_siblings_accepted, fleet_later_siblings_rejected,
                                                      alpha, self.prior_weight)
        by_drafter = {kind: acceptance_estimate(accepted, rejected, alpha, self.prior_weight)
                      for kind, (accepted, rejected) in (drafter_first_tries or {}).items()}
        offer_by_drafter = {kind: offer_estimate(offers, misses, offer_rate, self.prior_weight)
                            for kind, (offers, misses) in (drafter_offers or {}).items()}
        fitted = _Fitted(costs, alpha, offer_rate, later_sibling_alpha, samples, by_drafter, offer_by_drafter,
                         prefill_ms_per_token=fit_prefill_rates(samples))
        in_use = self._state
        for kind in list(in_use.by_drafter):
            self._drafter_costs(fitted, kind)
        for drafting in list(in_use.by_self_drafting):
            self._self_drafted_costs(fitted, drafting)
        self._state = fitted  # one reference swap: atomic

    def set_ahead_contention(self, contention: float) -> None:
        """How much the drafts made ahead and the verify beside them slow each other (`StepCosts.ahead_contention`):
        0 where the draft and the target compute on hardware of their own, more where they share a machine's CPU
        cores (1: as if they took turns). The router says so from what the services report of their cores and from
        its own steps' times; it takes effect at once (the drafter kinds' models are fitted again when next asked
        for)."""
        if not 0.0 <= contention <= 1.0:
            raise ValueError(f"contention must be in [0, 1], got {contention}")
        if contention == self.ahead_contention:
            return
        self.ahead_contention = contention
        state = self._state
        # A self-drafting target's models draft nothing ahead: they stay as fitted.
        self._state = replace(state, costs=state.costs.with_contention(contention), by_drafter={})

    def prefill_ms_per_token(self, kind: str | None) -> float | None:
        """What a draft service of drafter ``kind`` takes per prompt token it computes, as its services measured it
        (samples that do not say their kind stand in where that kind has none); None until measured."""
        rates = self._state.prefill_ms_per_token
        return rates.get(kind or "", rates.get(""))

    def costs_for(self, kind: str) -> CostModel:
        """The cost model of a draft pool whose drafter is ``kind``: the target's and the router's costs as the
        fleet's, the draft's fitted from that kind's samples only (and samples that do not say their kind), over
        that kind's default (`drafter_defaults`). Fitted once per refit: by `update` for the kinds in use, else
        when first asked for."""
        return self._drafter_costs(self._state, kind)

    def self_drafted_costs(self, drafting: SelfDrafting) -> CostModel:
        """The cost model of a target that drafts in its own verify: no draft call (draft samples of other fleets in
        the same Redis do not count), and its drafts priced as the tokens they add to the verify."""
        return self._self_drafted_costs(self._state, drafting)

    def _drafter_costs(self, state: _Fitted, kind: str) -> CostModel:
        found = state.by_drafter.get(kind)
        if found is None:
            own = [s for s in state.samples if s.role != "draft" or s.drafter in (kind, None)]
            found = state.by_drafter[kind] = CostModel.fit(
                own, drafter_defaults(kind, self._defaults), max_tokens=max(33, self.max_depth + 2),
                ahead_alpha=state.alpha_for(kind) if self.drafts_ahead else None,
                ahead_contention=self.ahead_contention)
        return found

    def _self_drafted_costs(self, state: _Fitted, drafting: SelfDrafting) -> CostModel:
        found = state.by_self_drafting.get(drafting)
        if found is None:
            found = state.by_self_drafting[drafting] = CostModel.fit(
                [s for s in state.samples if s.role != "draft"], self._defaults,
                max_tokens=max(33, int(2 + drafting.verify_tokens(self.max_depth))), self_drafted=drafting)
        return found

    def alphas(self, per_sequence_counts: Sequence[tuple[int, int]]) -> list[float]:
        """Each sequence's acceptance estimate from its (accepted, rejections) counts."""
        return self._alphas(per_sequence_counts, self._state.fleet_alpha)

    def _alphas(self, per_sequence_counts: Sequence[tuple[int, int]], fleet_alpha: float) -> list[float]:
        return [acceptance_estimate(a, r, fleet_alpha, self.prior_weight) for a, r in per_sequence_counts]

    def offer_rates(self, offer_counts: Sequence[tuple[int, int]]) -> list[float]:
        """Each sequence's offer-rate estimate from its (offers, misses) counts."""
        return self._offer_rates(offer_counts, self._state.fleet_offer_rate, len(offer_counts))

    def _offer_rates(self, offer_counts: Sequence[tuple[int, int] | None] | None, fleet_rate: float, batch: int
                     ) -> list[float]:
        if offer_counts is None:
            return [fleet_rate] * batch
        if len(offer_counts) != batch:
            raise ValueError(f"offer_counts must have one entry per sequence ({batch}), got {len(offer_counts)}")
        return [1.0 if counts is None else offer_estimate(*counts, fleet_rate, self.prior_weight)
                for counts in offer_counts]

    def choose(self, per_sequence_counts: Sequence[tuple[int, int]], limits: Sequence[int] | None = None,
               offer_counts: Sequence[tuple[int, int] | None] | None = None, calibration: float = 1.0,
               contexts: Sequence[int] | None = None, drafter: str | SelfDrafting | None = None,
               first_position_counts: Sequence[tuple[int, int]] | None = None) -> DepthDecision:
        """Depths for one step; `per_sequence_counts[i]` is sequence i's (accepted, rejections), `offer_counts[i]`
        its (offers, misses) (the fleet's offer rate for everyone when not given; None: its drafts are in hand, offered
        for certain), `contexts[i]` its KV length
        (its committed tokens; None: the cost model's reference context); `calibration` as in `choose_depths`.
        `first_position_counts[i]`: sequence i's (accepted, tried) drafts at the first position of a chain, which
        then has a rate of its own (`position_acceptance`; None: one rate for every position)."""
        state = self._state  # read once: one consistent model for the whole decision
        costs = state.costs if drafter is None else self._self_drafted_costs(state, drafter) if isinstance(
            drafter, SelfDrafting) else self._drafter_costs(state, drafter)
        prior = state.alpha_for(drafter if isinstance(drafter, str) else None)
        first_alphas = None
        if first_position_counts is None:
            alphas = self._alphas(per_sequence_counts, prior)
        else:
            if len(first_position_counts) != len(per_sequence_counts):
                raise ValueError(f"first_position_counts must have one entry per sequence "
                                 f"({len(per_sequence_counts)}), got {len(first_position_counts)}")
            by_position = [position_acceptance(accepted, rejections, first_accepted, first_tried, prior,
                                               self.prior_weight)
                           for (accepted, rejections), (first_accepted, first_tried)
                           in zip(per_sequence_counts, first_position_counts, strict=True)]
            first_alphas, alphas = [first for first, _ in by_position], [later for _, later in by_position]
        rates = self._offer_rates(offer_counts, state.offer_rate_for(drafter if isinstance(drafter, str) else None),
                                  len(alphas))
        if self.pinned_depth is not None:
            return pinned_decision(alphas, costs, self.pinned_depth, max_depth=self.max_depth, limits=limits,
                                   offer_rates=rates, contexts=contexts, first_alphas=first_alphas)
        if self.mode == "latency":
            return choose_depths_for_latency(alphas, costs, self.max_depth, self.min_goodput,
                                             limits=limits, uniform=self.uniform, offer_rates=rates,
                                             min_gain=self.min_gain, calibration=calibration, contexts=contexts,
                                             first_alphas=first_alphas)
        return choose_depths(alphas, costs, self.max_depth, limits=limits, uniform=self.uniform,
                             offer_rates=rates, min_gain=self.min_gain, calibration=calibration, contexts=contexts,
                             first_alphas=first_alphas)

    def choose_tree(self, per_sequence_counts: Sequence[tuple[int, int]],
                    candidates: Sequence[Sequence[TreePlan]],
                    offer_counts: Sequence[tuple[int, int]] | None = None, calibration: float = 1.0,
                    later_sibling_counts: Sequence[tuple[int, int]] | None = None,
                    contexts: Sequence[int] | None = None) -> TreeDecision:
        """The best of ``candidates`` (each one plan per sequence) for one step; see `choose_tree_plan`.
        ``later_sibling_counts[i]``: sequence i's (accepted, rejected) later siblings, their rate shrunk toward the
        fleet's; until any later sibling has been tried anywhere, each sequence's own alpha stands in for it.
        ``contexts`` as in `choose`."""
        state = self._state
        alphas = self._alphas(per_sequence_counts, state.fleet_alpha)
        rates = self._offer_rates(offer_counts, state.fleet_offer_rate, len(alphas))
        later_sibling_counts = later_sibling_counts or [(0, 0)] * len(alphas)
        if len(later_sibling_counts) != len(alphas):
            raise ValueError(f"later_sibling_counts must have one entry per sequence ({len(alphas)}), "
                             f"got {len(later_sibling_counts)}")
        fleet_beta = state.fleet_later_sibling_alpha
        betas = [acceptance_estimate(a, r, alpha if fleet_beta is None else fleet_beta, self.prior_weight)
                 for (a, r), alpha in zip(later_sibling_counts, alphas, strict=True)]
        return choose_tree_plan(alphas, state.costs, candidates, rates, self.min_gain, calibration, betas, contexts)

    def choose_pools(self, pools: Sequence[PoolCounts], calibration: float = 1.0,
                     contexts: Sequence[int] | None = None) -> PoolDecision:
        """Each sequence's draft pool and depth for one step (several pools; see
        `specfleet.policy.drafter_choice`): each pool priced by its drafter kind's costs (`costs_for`), each
        sequence's acceptance and offer rate with that pool from its own counts there, shrunk toward the fleet's.
        Pinned (``--depth K``): each sequence drafts K from the pool it has been accepted most by."""
        state = self._state
        options = [PoolOption(pool.name, self._drafter_costs(state, pool.kind),
                              self._alphas(pool.first_tries, state.alpha_for(pool.kind)),
                              self._offer_rates(pool.offers, state.offer_rate_for(pool.kind), len(pool.limits)),
                              pool.limits)
                   for pool in pools]
        if self.pinned_depth is None:
            return choose_pools(options, self.max_depth, contexts=contexts, min_gain=self.min_gain,
                                calibration=calibration)
        return choose_pools([replace(o, limits=[min(limit, self.pinned_depth) for limit in o.limits])
                             for o in options], self.pinned_depth, contexts=contexts, pinned=True)
