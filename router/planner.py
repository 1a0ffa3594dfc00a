"""Choosing a step's plan: what each sequence drafts, within the room its request, the target and its strategy
leave, by the depth policy (a chain depth per sequence, or with --tree a tree shape per step).

The decision and its reason go to the policy feed (for `GetServerInfo`) and, every few seconds, to the log,
with how the steps since the last line compared with their predictions (`router.prediction_audit`).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from router.live_request import LiveRequest
from router.policy_feed import PolicyFeed
from router.ports import Proposer
from router.prediction_audit import Calibration, ContentionFit, PredictionAudit
from router.replicas import ReplicaInfo
from router.self_drafted import SELF_DRAFTED, SelfDrafted
from router.strategies import Strategies
from specfleet.config import RouterConfig
from specfleet.policy import DepthDecision, TreeDecision, TreePlan
from specfleet.policy.catch_up import CatchUp, price_catch_up
from specfleet.policy.costs import SelfDrafting
from specfleet.policy.depth_policy import PoolCounts
from specfleet.policy.drafter_choice import PoolDecision
from specfleet.speculation import PREFILL_TOKENS, DraftPlan, StepPlan, is_prefill
from specfleet.stats import AcceptanceCounts
from specfleet.trees.shapes import TreeShape, chain_shape

log = logging.getLogger("specfleet.router")

DECISION_LOG_INTERVAL_S = 5.0
"""How often the decision goes to the log at INFO (each one goes at DEBUG): often enough to follow a run."""
CONTENTION_STEP = 0.1
"""How far the measured contention between drafts made ahead and the verify must move before the policy is re-priced
(which refits its drafter kinds' models): less is noise between medians."""


class Planner:
    def __init__(self, config: RouterConfig, feed: PolicyFeed, strategies: Proposer, target: str, max_context: int,
                 audit: PredictionAudit | None = None, calibration: Calibration | None = None,
                 target_info: ReplicaInfo | None = None, contention: ContentionFit | None = None) -> None:
        """``target_info``: what the target said of itself, where its cores are known (drafting ahead on them is
        priced differently, `_price_sharing`); ``contention``: what the steps measure of that (`ContentionFit`)."""
        self.config = config
        self.target_info = target_info
        self._sharing: bool | None = None  # whether a draft pool computes on the target's cores, as last seen
        self.feed = feed
        self.strategies = strategies
        self.target = target
        self.max_context = max_context
        self.audit = audit
        self.calibration = calibration
        self.contention = contention
        self.pools = config.speculation_pools
        self._last_log = 0.0

    def plan(self, batch: list[LiveRequest]) -> StepPlan:
        """The policy's depths, or with --tree the tree shapes, within the room each sequence has left."""
        calibration = 1.0 if self.calibration is None else self.calibration.factor(len(batch))
        if self.config.draft_ahead:
            self._price_sharing(batch)
        shape = self.config.tree_shape
        catch_up: CatchUp | None = None
        if len(self.pools) > 1:  # several draft pools: a pool and a depth per sequence (chains only)
            plan = self._pools(batch, calibration)  # each pool's catch-up priced in its own right
        elif shape is None:
            # Priced by its drafter kind's own costs: a Redis shared with pools of other kinds holds theirs too. A
            # SPACE target's drafts cost no call, and make its verify feed the mask groups too.
            kind = self._self_drafting() if self.config.self_draft else _pool_kind(batch, self.pools[0]) \
                if self.pools else None
            may_draft, catch_up, declined = self._may_draft(batch, calibration)
            rooms = [self.depth_room(s) if may else 0 for s, may in zip(batch, may_draft, strict=True)]
            decision = self._choose(batch, rooms, calibration, kind)
            plan = StepPlan({s.seq_id: DraftPlan(d) for s, d in zip(batch, decision.depths, strict=True)},
                            decision.reason, *_predictions(decision), overlap=decision.overlap)
        else:
            may_draft, catch_up, declined = self._may_draft(batch, calibration)
            plan = self._trees(batch, shape, calibration, may_draft)
        if catch_up is not None:
            plan = dataclasses.replace(plan, reason=f"{plan.reason}; {catch_up.describe()}", no_catch_up=declined)
        if plan.predicted_ms > 0 and self._prefills(batch, plan):  # only the audited steps need to know
            plan = dataclasses.replace(plan, prefills=True)
        self._log(len(batch), plan.reason)
        return plan

    def _price_sharing(self, batch: list[LiveRequest]) -> None:
        """Drafting ahead overlaps drafting with the verify; where a draft pool's replica computes on the target's
        own CPU cores (one machine, not pinned apart), the two slow each other down, by as much as this router's
        steps measure (`ContentionFit`; until they have, as if they took turns), and the policy prices the steps so
        (`DepthPolicy.set_ahead_contention`). Said in the log when it changes."""
        if self.target_info is None:
            return
        infos = [(pool, info) for pool in self.pools if (info := _pool_info(batch, pool)) is not None]
        if not infos:
            return
        shared = [pool for pool, info in infos if info.shares_cores_with(self.target_info)]
        if bool(shared) != self._sharing:
            self._sharing = bool(shared)
            if shared:
                log.info("draft pool %s computes on CPU cores the target at %s uses too (%s): drafting ahead is "
                         "priced one after the verify until the steps measure how much the two slow each other "
                         "(pin them apart, e.g. with taskset, to overlap)",
                         ", ".join(shared), self.target, _cores(self.target_info.cpus))
            else:
                log.info("the draft pools and the target at %s compute on separate cores or devices: drafting ahead "
                         "is priced overlapping the verify", self.target)
        measured = self.contention.estimate() if shared and self.contention is not None else None
        contention = 0.0 if not shared else 1.0 if measured is None else measured
        current = self.feed.policy.ahead_contention
        if contention == current or (contention and current and abs(contention - current) < CONTENTION_STEP):
            return
        self.feed.policy.set_ahead_contention(contention)
        if measured is not None:
            log.info("drafting ahead beside the target at %s on its cores: its steps measure a contention of %.2f, "
                     "priced as the longer of the draft and the verify plus %.0f%% of the shorter", self.target,
                     measured, 100 * measured)

    def _choose(self, batch: list[LiveRequest], rooms: list[int], calibration: float,
                kind: str | SelfDrafting | None) -> DepthDecision:
        return self.feed.policy.choose([_first_tries(s) for s in batch], rooms, self._offer_counts(batch),
                                       calibration, _contexts(batch), kind, [_first_position(s) for s in batch])

    def _offer_counts(self, batch: list[LiveRequest]) -> list[tuple[int, int] | None]:
        """Each sequence's (offers, misses); None where its drafts are in hand before the step (a target that looks
        them up sent them with its last verdict): offered for certain."""
        found = self._self_drafted() if self.config.self_draft else None
        return [None if found is not None and found.candidates_in_hand(s.seq_id) else _offers(s) for s in batch]

    def _may_draft(self, batch: list[LiveRequest], calibration: float
                   ) -> tuple[list[bool], CatchUp | None, frozenset[str]]:
        """Per sequence, whether it may draft from the one draft pool as far as the pool's catch-up of it goes; that
        catch-up's price where one was weighed (`_price_catch_up`); and the sequences it was declined for. Drafting
        again after plain steps must not make the step wait for a catch-up that cannot pay (`_catch_up_pays`, as with
        several pools). A pinned depth, and a target drafting for itself, draft as told."""
        if not self.pools or self.config.self_draft or self.config.pinned_depth is not None:
            return [True] * len(batch), None, frozenset()
        return self._may_draft_from(self.pools[0], batch, calibration)

    def _may_draft_from(self, pool: str, batch: list[LiveRequest], calibration: float, price: bool = True
                        ) -> tuple[list[bool], CatchUp | None, frozenset[str]]:
        """`_may_draft` for the draft pool ``pool``; without ``price``, the catch-up is not weighed."""
        info, starting = _pool_info(batch, pool), _starting_tokens(batch)
        may = [_catch_up_pays(s, pool, info, starting) for s in batch]
        catch_up = self._price_catch_up(pool, batch, may, info, calibration) if price else None
        if catch_up is None or catch_up.pays:
            return may, catch_up, frozenset()
        declined = frozenset(s.seq_id for s in batch if _catching_up(s, pool))
        return [m and s.seq_id not in declined for s, m in zip(batch, may, strict=True)], catch_up, declined

    def _price_catch_up(self, pool: str, batch: list[LiveRequest], may: list[bool], info: ReplicaInfo | None,
                        calibration: float) -> CatchUp | None:
        """The draft pool ``pool``'s catch-up on the sequences it lacks the prompts of, priced against what drafting
        from it would save them over the rest of their requests (`specfleet.policy.catch_up`), by the depths the
        policy would choose if the pool held them. None where nothing is to be weighed: no sequence behind, a
        drafter without a KV cache, a rate not yet measured, or prompts computed alongside the target on cores of
        their own (hidden behind the target's own prefill). The saving is priced against plain decoding of the whole
        batch: exact at a batch's first step, where every sequence catches up; beside sequences that draft already
        it errs generous (their drafting is counted as the catch-up's). With several pools, drafting from this one
        alone is what is weighed."""
        catching = [i for i, (s, m) in enumerate(zip(batch, may, strict=True))
                    if m and _catching_up(s, pool) and s.tokens_left > 1]
        if not catching or info is None or not info.num_slots:
            return None
        rate = self.feed.policy.prefill_ms_per_token(info.kind)
        if rate is None:
            return None
        if self.config.prefill_alongside and self.target_info is not None \
                and not info.shares_cores_with(self.target_info):
            return None
        # The rooms the sequences behind would have if their drafter held them (computed alongside, it holds none).
        several = len(self.pools) > 1
        rooms = [(self._room_if_held(s) if i in catching else self.depth_room(s, pool if several else None))
                 if may[i] else 0 for i, s in enumerate(batch)]
        decision = self._choose(batch, rooms, calibration, info.kind)
        drafting = decision.goodput if any(decision.depths[i] for i in catching) else 0.0
        return price_catch_up([_behind(batch[i], pool) for i in catching], [batch[i].tokens_left for i in catching],
                              rate, decision.uniform_goodput[0], drafting)

    def _room_if_held(self, seq: LiveRequest) -> int:
        """`depth_room` as it would be if the draft pool held ``seq``."""
        return max(0, min(self._request_limits(seq)))

    def _self_drafted(self) -> SelfDrafted | None:
        """The self-drafted strategy, where the router has one."""
        found = self.strategies.strategies.get(SELF_DRAFTED) if isinstance(self.strategies, Strategies) else None
        return found if isinstance(found, SelfDrafted) else None

    def _self_drafting(self) -> SelfDrafting:
        """How the target drafts for itself, as its strategy holds it (GetInfo's)."""
        found = self._self_drafted()
        return SelfDrafting() if found is None else found.drafting

    def depth_room(self, seq: LiveRequest, pool: str | None = None) -> int:
        """Most draft tokens ``seq`` can use: what its request, the target's cache and its strategy (or the draft
        pool ``pool``'s) allow."""
        return self._within(seq, self._request_limits(seq), pool)

    def _request_limits(self, seq: LiveRequest) -> list[int]:
        """Most draft tokens ``seq`` can use as far as the depth limit, its request and the target's cache go."""
        return [self.config.max_depth, seq.tokens_left - 1, self.max_context - len(seq.tokens)]

    def node_room(self, seq: LiveRequest) -> int:
        """Most tree nodes ``seq`` can use: the budget, and what the caches can hold after its tokens."""
        return self._within(seq, [self.config.max_tree_nodes, self.max_context - len(seq.tokens)])

    def _within(self, seq: LiveRequest, limits: list[int], pool: str | None = None) -> int:
        if pool is None:
            room = self.strategies.room(seq)
        else:
            assert isinstance(self.strategies, Strategies), "several draft pools need router.strategies.Strategies"
            room = self.strategies.room(seq, pool)
        if room is not None:
            limits.append(room)
        return max(0, min(limits))

    def _trees(self, batch: list[LiveRequest], shape: TreeShape, calibration: float, may_draft: list[bool]
               ) -> StepPlan:
        """With --depth K the configured shape cut to K levels and --max-tree-nodes; with --depth auto the
        best of plain decoding, chains and the shape at every node budget, by the policy's cost model."""
        rooms = [(self.node_room(s), self.depth_room(s)) if may else (0, 0)
                 for s, may in zip(batch, may_draft, strict=True)]
        pinned = self.config.pinned_depth
        if pinned is not None:
            shapes = [shape.fit(self.config.max_tree_nodes, pinned)]
        else:
            shapes = [None, *(chain_shape(d) for d in range(1, self.config.max_depth + 1))]
            for budget in range(2, self.config.max_tree_nodes + 1):
                fitted = shape.fit(budget, self.config.max_depth)
                if fitted is not None and not fitted.is_chain and fitted not in shapes:
                    shapes.append(fitted)
        # Each candidate, fitted to each sequence's room.
        per_seq = [[None if c is None else c.fit(*room) for room in rooms] for c in shapes]
        reason, predicted = f"pinned tree {shapes[0].describe() if shapes[0] else 'none'}", (0.0, 0.0)
        if len(shapes) > 1:
            plans = [[TreePlan(0, ()) if f is None else TreePlan(f.nodes, f.level_tries()) for f in fitted]
                     for fitted in per_seq]
            later_siblings = [(s.stats.acceptance.later_siblings_accepted,
                               s.stats.acceptance.later_siblings_rejected) for s in batch]
            decision = self.feed.policy.choose_tree([_first_tries(s) for s in batch], plans,
                                                    [_offers(s) for s in batch], calibration, later_siblings,
                                                    _contexts(batch))
            per_seq = [per_seq[decision.index]]
            reason, predicted = decision.reason, _predictions(decision)
        return StepPlan({s.seq_id: _tree_plan(fitted) for s, fitted in zip(batch, per_seq[0], strict=True)}, reason,
                        *predicted)

    def _pools(self, batch: list[LiveRequest], calibration: float) -> StepPlan:
        """Each sequence's draft pool and depth, by the policy (`DepthPolicy.choose_pools`), from each pool's
        drafter costs and each sequence's own acceptance with each pool; the sequence drafts from its pool this step
        (its ``strategy``)."""
        pools: list[PoolCounts] = []
        priced: list[str] = []
        declined: set[str] = set()
        for pool in self.pools:
            info = _pool_info(batch, pool)
            # A pinned depth drafts as told, but not from a pool a whole catch-up behind.
            may, catch_up, declined_here = self._may_draft_from(pool, batch, calibration,
                                                                price=self.config.pinned_depth is None)
            if catch_up is not None:
                priced.append(f"{pool}: {catch_up.describe()}")
            declined |= declined_here
            pools.append(PoolCounts(pool, (info.kind if info is not None else "") or pool,
                                    [_first_tries(s, pool) for s in batch], [_offers(s, pool) for s in batch],
                                    [self.depth_room(s, pool) if m else 0 for s, m in zip(batch, may, strict=True)]))
        decision = self.feed.policy.choose_pools(pools, calibration, _contexts(batch))
        for seq, pool in zip(batch, decision.pools, strict=True):
            seq.strategy = pool
        return StepPlan({s.seq_id: DraftPlan(d) for s, d in zip(batch, decision.depths, strict=True)},
                        "; ".join([decision.reason, *priced]), *_predictions(decision),
                        no_catch_up=frozenset(declined))

    def _prefills(self, batch: list[LiveRequest], plan: StepPlan) -> bool:
        """Whether the step's prediction leaves out what it does first, read before the step moves the caches on:
        (re)sending some sequence's whole prompt, or a self-drafted sequence drafting with no candidates held (its
        first drafting step after a plain one: it can only draft, and emits one token whatever its depth). Either
        way the step is kept out of the audit and the calibration. A self-drafted sequence has no draft cache."""
        restarts = self._self_drafted_restarts(batch, plan) if self.config.self_draft else False
        return restarts or any(is_prefill(s.tokens[s.target_cached:]) or (
            plan.draft(s.seq_id).levels > 0 and s.strategy != SELF_DRAFTED and is_prefill(s.tokens[s.draft_cached:]))
            for s in batch)

    def _self_drafted_restarts(self, batch: list[LiveRequest], plan: StepPlan) -> bool:
        found = self._self_drafted()
        return found is not None and any(
            plan.draft(s.seq_id).levels > 0 and not found.holds_candidates(s.seq_id) for s in batch)

    def _log(self, batch_size: int, reason: str) -> None:
        summary = f"batch {batch_size}: {reason}"
        self.feed.record_decision(summary)
        now = time.monotonic()
        if now - self._last_log > DECISION_LOG_INTERVAL_S:
            audit = self.audit.report() if self.audit is not None else ""
            log.info("depth policy on %s, %s%s", self.target, summary,
                     f" (since the last line: {audit})" if audit else "")
            self._last_log = now
        else:
            log.debug("depth policy on %s, %s", self.target, summary)


def _tree_plan(fitted: TreeShape | None) -> DraftPlan:
    if fitted is None:
        return DraftPlan()
    return DraftPlan(fitted.levels, None if fitted.is_chain else fitted)  # a chain stays a chain on the wire


def _first_tries(seq: LiveRequest, pool: str | None = None) -> tuple[int, int]:
    """(accepted, rejected) first tries: what the policy's acceptance estimate counts (with draft pool ``pool``'s
    drafter only, when given)."""
    counts = seq.stats.acceptance if pool is None else seq.stats.by_pool.get(pool, AcceptanceCounts())
    return counts.first_accepted, counts.rejections


def _first_position(seq: LiveRequest) -> tuple[int, int]:
    """(accepted, tried) drafts at a chain's first position: their rate is priced apart from the later positions'
    (a SPACE target's first mask is accepted far more often than the rest, bench/space.md)."""
    counts = seq.stats.acceptance
    tried = counts.proposed_by_position[0] if counts.proposed_by_position else 0
    return (counts.accepted_by_position[0] if counts.accepted_by_position else 0), tried


def _offers(seq: LiveRequest, pool: str | None = None) -> tuple[int, int]:
    counts = seq.stats.acceptance if pool is None else seq.stats.by_pool.get(pool, AcceptanceCounts())
    return counts.offers, counts.misses


def _pool_info(batch: list[LiveRequest], pool: str) -> ReplicaInfo | None:
    """What ``pool``'s replicas said of themselves (GetInfo); None until one has."""
    for seq in batch:
        session = seq.sessions.get(pool)
        if session is not None and session.replica is not None and session.replica.info is not None:
            return session.replica.info
    return None


def _pool_kind(batch: list[LiveRequest], pool: str) -> str | None:
    """The drafter kind of ``pool``, as its replicas said; None until one has."""
    info = _pool_info(batch, pool)
    return None if info is None else info.kind


def _catch_up_pays(seq: LiveRequest, pool: str, info: ReplicaInfo | None, starting: int = 0) -> bool:
    """Whether ``seq`` may draft from ``pool`` this step, as far as the tokens that pool lacks of it go. A drafter that
    keeps a KV cache (``num_slots``) must first compute every token of the sequence it does not hold, all of them
    the first time, and the step waits for it with every sequence in the batch: at a long context, seconds. At a
    sequence's first step the target computes its prompt too, and any pool may start. Later, a pool behind by more
    tokens than the sequence may still generate is left out: a prefilled token costs a fraction of a decoding step,
    and a better drafter saves a fraction of the steps left, so such a catch-up cannot pay for itself on its own.

    Except beside sequences that start in this step (``starting``: their prompts' tokens, `_starting_tokens`): the
    step sends their prompts through the target (and through a pool where they draft) anyway, so a catch-up no
    longer than those is of the size of the step's own work, paid once. So the first sequence of a batch that
    filled up one by one, which started alone and decoded plainly (drafting at batch 1 seldom pays), may draft
    with the rest once they arrive."""
    if seq.target_cached == 0 or info is None or not info.num_slots:
        return True
    return _behind(seq, pool) <= max(seq.tokens_left, starting)


def _behind(seq: LiveRequest, pool: str) -> int:
    """The tokens of ``seq`` that ``pool``'s drafter does not hold."""
    session = seq.sessions.get(pool)
    return len(seq.tokens) - (0 if session is None else session.cached)


def _catching_up(seq: LiveRequest, pool: str) -> bool:
    """Whether ``pool``'s drafter lacks a prompt's worth of ``seq`` (more than a step sends, `is_prefill`)."""
    return _behind(seq, pool) > PREFILL_TOKENS


def _starting_tokens(batch: list[LiveRequest]) -> int:
    """The prompt tokens of the sequences that start in this step (whose whole context the target computes)."""
    return sum(len(s.tokens) for s in batch if s.target_cached == 0)


def _cores(cpus: tuple[int, ...]) -> str:
    return f"cores {','.join(map(str, cpus))}" if len(cpus) <= 8 else f"{len(cpus)} cores"


def _contexts(batch: list[LiveRequest]) -> list[int]:
    """Each sequence's KV length in this step: its committed tokens, where its drafts and the target's verify
    start (the statistic the services' latency samples carry)."""
    return [len(s.tokens) for s in batch]


def _predictions(decision: DepthDecision | TreeDecision | PoolDecision) -> tuple[float, float]:
    """A decision's predicted step time and tokens emitted, as `StepPlan` keeps them for the audit."""
    return decision.step_ms, decision.goodput * decision.step_ms / 1000.0
