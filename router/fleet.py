"""The replicas the router drives, kept in step with discovery: a StepLoop per target, the draft pool, and the
requests parked while no target is left.

Replicas come and go between steps. A target that leaves has its loop cancelled (at an await, never between a
verdict and its commit, so no token is lost or doubled) and its sequences move to another target's loop, which
re-prefills them. A target that stops answering (`TargetLost`, a fixed address as much as a discovered one) ends
its loop the same way, uncommitted; its sequences move, and it is asked for its info again, with backoff, until it
answers and rejoins. A draft that leaves has its sequences re-pinned to another draft, which re-prefills them, or
run at depth 0. Either way the output is unchanged: every token is the target's. A request moves at most
``--max-moves`` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from collections.abc import Sequence as Seq
from dataclasses import replace

import grpc

from router.discovery import PoolWatcher
from router.draft_ahead import DraftAhead
from router.draft_link import GrpcDraftLink
from router.draft_pool import DraftPool
from router.live_request import DRAFT_POOL, DraftSession, LiveRequest
from router.loop import StepLoop
from router.observers import MetricsExporter, TelemetryExporter
from router.planner import Planner
from router.policy_feed import PolicyFeed
from router.ports import StepObserver
from router.prediction_audit import Calibration, ContentionFit, PredictionAudit
from router.replicas import DraftReplica, ReplicaError, ReplicaGone, TargetLost, TargetReplica, check_compatible
from router.self_drafted import SELF_DRAFTED, SelfDrafted
from router.strategies import Strategies
from router.target_link import GrpcTargetLink
from router.target_verifier import TargetVerifier
from specfleet.config import RouterConfig
from specfleet.otel import RouterMetrics
from specfleet.policy.costs import SelfDrafting
from specfleet.telemetry import TelemetryWriter

log = logging.getLogger("specfleet.router")

JOIN_TIMEOUT_S = 30.0  # a replica that just turned ready answers GetInfo at once; else it is retried
JOIN_RETRY_S = (1.0, 30.0)  # first and longest wait between GetInfo attempts
# A removed replica's channel closes once calls already under way have ended (closing cancels them, which would
# end the step loop that made them); every call has its own deadline, so this only bounds a stuck one.
CLOSE_AFTER_S = 1.0
CLOSE_GRACE_S = 120.0


def connect_target(address: str, interceptors: Seq[grpc.aio.ClientInterceptor] = ()) -> TargetReplica:
    return TargetReplica(address, GrpcTargetLink(address, interceptors))


def connect_draft(address: str, pool: str = DRAFT_POOL, interceptors: Seq[grpc.aio.ClientInterceptor] = ()
                  ) -> DraftReplica:
    return DraftReplica(address, GrpcDraftLink(address, interceptors), pool=pool)


def step_loop_for(target: TargetReplica, config: RouterConfig, feed: PolicyFeed, telemetry: TelemetryWriter | None,
                  metrics: RouterMetrics, on_draining: Callable[[str], None] | None = None) -> StepLoop:
    """The step loop of one target replica (which has answered GetInfo), wired to its ports: each draft pool as a
    strategy, the target behind a verifier, the policy behind a planner, and the step's observers."""
    assert target.info is not None
    if config.tree != "none" and target.info.chains_only:
        log.warning("target %s verifies draft chains only (a llamacpp backend): its sequences draft chains, not "
                    "--tree %s trees", target.address, config.tree)
        config = replace(config, tree="none")
    audit = PredictionAudit()
    # With --calibration-half-life 0 the policy takes its predictions as they are.
    calibration = Calibration(config.calibration_half_life) if config.calibration_half_life else None
    if config.self_draft:
        if not target.info.max_draft_next:
            log.warning("target %s does not draft for itself (it was not started with a SPACE model, lookahead or "
                        "prompt lookup, see --space-masks, --lookahead-window, --prompt-lookup-depth): its sequences "
                        "decode plainly", target.address)
        drafting = SelfDrafting(target.info.self_drafting or "space", target.info.draft_next_width)
        strategies = Strategies({SELF_DRAFTED: SelfDrafted(target.info.max_draft_next, drafting)})
    else:
        strategies = Strategies({name: DraftAhead(pool, metrics) if config.draft_ahead else pool
                                 for name in (config.speculation_pools or [DRAFT_POOL])
                                 for pool in [DraftPool(config.draft_timeout_ms, config.draft_retry_s, metrics, name,
                                                        config.prefill_alongside)]})
    contention = ContentionFit() if config.draft_ahead else None
    planner = Planner(config, feed, strategies, target.address, target.info.max_seq_len, audit, calibration,
                      target.info, contention)
    observers: list[StepObserver] = [audit, MetricsExporter(metrics)]
    observers += [o for o in (calibration, contention) if o is not None]
    if telemetry is not None:
        observers.append(TelemetryExporter(telemetry))
    verifier = TargetVerifier(target, config.verify_timeout_ms / 1000, metrics, on_draining)
    return StepLoop(target.address, planner, strategies, verifier, observers, metrics,
                    capacity=target.info.num_slots, max_context=target.info.max_seq_len)


class Fleet:
    def __init__(self, config: RouterConfig, feed: PolicyFeed, telemetry: TelemetryWriter | None,
                 metrics: RouterMetrics, interceptors: Seq[grpc.aio.ClientInterceptor] = ()) -> None:
        self.config = config
        self.feed = feed
        self.telemetry = telemetry
        self.metrics = metrics
        self.interceptors = interceptors
        self.loops: dict[str, StepLoop] = {}  # by target address
        self.targets: dict[str, TargetReplica] = {}  # the replicas those loops verify on
        self.drafts: list[DraftReplica] = []
        self.parked: dict[str, LiveRequest] = {}  # by seq_id, waiting for a target
        # Loops of targets that left, while their step is being cancelled: their sequences are in transit and must
        # still be seen when a draft leaves at the same moment.
        self.leaving: list[StepLoop] = []
        self.reference: TargetReplica | None = None  # the first target: every replica must share its tokenizer
        self._wanted_targets: frozenset[str] = frozenset()  # what discovery last said the pool holds
        self._runs: dict[str, asyncio.Task] = {}  # each loop's run()
        self._give_ups: dict[str, asyncio.TimerHandle] = {}  # by seq_id: when a parked request stops waiting
        # By address: replicas being asked for their info, and incompatible ones (not asked again while they stay).
        self._joining_targets: dict[str, asyncio.Task] = {}
        self._joining_drafts: dict[str, asyncio.Task] = {}
        self._refused_targets: set[str] = set()
        self._refused_drafts: set[str] = set()
        self._background: set[asyncio.Task] = set()
        self._last_max_context = 0
        self.pools = config.speculation_pools  # the draft pools' names, in the order --drafts gives them

    # -- what the router asks ---------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        """The smallest context of the targets there are (of the last there were, while there are none)."""
        if self.loops:
            self._last_max_context = min(loop.max_context for loop in self.loops.values())
        return self._last_max_context

    @property
    def queued(self) -> int:
        return sum(len(loop.waiting) for loop in self.loops.values()) + len(self.parked)

    @property
    def live(self) -> int:
        return sum(len(loop.live) for loop in self.loops.values())

    @property
    def slots(self) -> int:
        """Sequence slots of all targets."""
        return sum(loop.capacity for loop in self.loops.values())

    def has_room(self) -> bool:
        """Nothing waits for a slot and at most half of them are taken: room for background work."""
        return self.queued == 0 and self.live * 2 <= self.slots

    @property
    def slot_usage(self) -> float:
        """The fraction of its targets' sequence slots the live requests hold (0 with no target)."""
        slots = self.slots
        return self.live / slots if slots else 0.0

    def place(self, seq: LiveRequest) -> None:
        """Hands ``seq`` to the least loaded target that has room for its context and is not shutting down, or parks
        it until one joins."""
        fitting = [loop for address, loop in self.loops.items()
                   if loop.max_context > len(seq.tokens) and not self.targets[address].draining]
        if fitting:
            min(fitting, key=lambda loop: loop.load).submit(seq)
            return
        self.parked[seq.seq_id] = seq
        self._give_ups[seq.seq_id] = asyncio.get_running_loop().call_later(self.config.target_wait_s,
                                                                            self._give_up, seq)

    @property
    def first_pool(self) -> str:
        """Where a new request drafts from until the policy chooses: the first pool given, or the target itself."""
        return SELF_DRAFTED if self.config.self_draft else next(iter(self.pools), DRAFT_POOL)

    def pick_draft(self, pool: str) -> DraftReplica | None:
        """The least loaded available replica of ``pool``, which a new sequence pins to (None: the pool has none)."""
        drafts = [d for d in self.drafts if d.pool == pool]
        if not self.config.speculates or not drafts:
            return None
        draft = min(drafts, key=lambda d: (not d.available, d.assigned))
        draft.assigned += 1
        return draft

    def pin_drafts(self) -> dict[str, DraftSession]:
        """A new sequence's session on each draft pool: pinned to the least loaded replica of each."""
        return {pool: DraftSession(self.pick_draft(pool)) for pool in self.pools}

    # -- start and follow -------------------------------------------------------------------------

    async def start(self, targets: PoolWatcher, drafts: Mapping[str, PoolWatcher], connect_timeout_s: float) -> None:
        """Connects to the first targets and drafts discovery reports (waiting for a first target), refusing to
        start if one does not answer or does not share the tokenizer; then follows the target pool and each draft
        pool (``drafts``, by pool name)."""
        target_sets = aiter(targets.addresses())
        first = await anext(target_sets, frozenset())
        while not first:
            log.info("waiting for a ready target in %s", targets.pool)
            first = await anext(target_sets)
        draft_sets = {pool: aiter(watcher.addresses()) for pool, watcher in drafts.items()}
        first_drafts = {pool: await anext(sets, frozenset()) for pool, sets in draft_sets.items()}

        joined_targets = [connect_target(a, self.interceptors) for a in sorted(first)]
        joined_drafts = [connect_draft(a, pool, self.interceptors) for pool, addresses in first_drafts.items()
                         for a in sorted(addresses)]
        replicas: list[TargetReplica | DraftReplica] = [*joined_targets, *joined_drafts]
        infos = await asyncio.gather(*(r.link.info(connect_timeout_s) for r in replicas))
        for replica, info in zip(replicas, infos, strict=True):
            replica.info = info
            pool = f" (draft pool {replica.pool})" if isinstance(replica, DraftReplica) and len(drafts) > 1 else ""
            log.info("%s at %s%s: model %r, %d slots x %d tokens", info.kind, replica.address, pool, info.model,
                     info.num_slots, info.max_seq_len)
        check_compatible(joined_targets, joined_drafts)
        self.reference = joined_targets[0]
        self._wanted_targets = first
        for target in joined_targets:
            self._add_target(target)
        self.drafts.extend(joined_drafts)
        self._spawn(self._follow(target_sets, self._reconcile_targets))
        for pool, sets in draft_sets.items():
            self._spawn(self._follow(sets, functools.partial(self._reconcile_drafts, pool)))

    async def stop(self) -> None:
        tasks = [*self._runs.values(), *self._joining_targets.values(), *self._joining_drafts.values(),
                 *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, sets: AsyncIterator[frozenset[str]], reconcile) -> None:
        async for addresses in sets:
            try:
                await reconcile(addresses)
            except Exception:  # a bug must not stop the router following its pools
                log.exception("applying a pool change failed")

    # -- targets ----------------------------------------------------------------------------------

    async def _reconcile_targets(self, wanted: frozenset[str]) -> None:
        self._wanted_targets = wanted
        self._refused_targets &= wanted  # one that leaves and comes back is asked again
        for address in sorted(wanted - self.loops.keys() - self._joining_targets.keys() - self._refused_targets):
            self._join(self._joining_targets, address, self._join_target(address))
        for address in sorted(self._joining_targets.keys() - wanted):
            self._joining_targets.pop(address).cancel()
        for address in sorted(self.loops.keys() - wanted):
            await self._remove_target(address)

    async def _join_target(self, address: str) -> None:
        target = connect_target(address, self.interceptors)
        if await self._introduce(target):
            self._add_target(target)
            parked = [s for s in self.parked.values() if not s.finished]
            self.parked.clear()
            for timer in self._give_ups.values():
                timer.cancel()
            self._give_ups.clear()
            for seq in parked:
                self.place(seq)
            log.info("target %s joined: %d target(s)%s", address, len(self.loops),
                     f"; it takes {len(parked)} waiting request(s)" if parked else "")

    def _add_target(self, target: TargetReplica) -> None:
        loop = step_loop_for(target, self.config, self.feed, self.telemetry, self.metrics, self._target_draining)
        self.loops[target.address] = loop
        self.targets[target.address] = target
        run = self._runs[target.address] = asyncio.get_running_loop().create_task(loop.run())
        run.add_done_callback(self._on_loop_end)

    def _target_draining(self, address: str) -> None:
        """``address`` says it is shutting down: the requests waiting for its slots go to the others, those it holds
        finish there, and once it holds none it is retired and asked again until a successor answers."""
        loop = self.loops[address]
        waiting = [s for s in loop.waiting if not s.finished]
        loop.waiting.clear()
        for seq in waiting:
            self.place(seq)
        log.warning("target %s is shutting down: it finishes its %d live sequence(s), %d waiting request(s) go "
                    "elsewhere", address, len(loop.live), len(waiting))
        self._spawn(self._retire_when_idle(address, loop))

    async def _retire_when_idle(self, address: str, loop: StepLoop) -> None:
        while self.loops.get(address) is loop and any(not s.finished for s in loop.live):
            await asyncio.sleep(0.1)
        if self.loops.get(address) is not loop:  # it failed or left meanwhile: handled there
            return
        await self._remove_target(address, "finished its sequences and stops")
        self._ask_again(address)

    def _on_loop_end(self, run: asyncio.Task) -> None:
        if run.cancelled():  # removed by the fleet, which moves the sequences itself
            return
        error = run.exception()
        if isinstance(error, TargetLost) and self._runs.get(error.address) is run:
            self._spawn(self._lose_target(error))
        elif error is not None:
            log.error("the step loop of a target ended unexpectedly", exc_info=error)

    async def _remove_target(self, address: str, why: str = "left") -> None:
        """Discovery says ``address`` left the pool (or it finished draining): its loop stops and its sequences
        move."""
        loop = self.loops.pop(address)
        target = self.targets.pop(address)
        run = self._runs.pop(address)
        self.leaving.append(loop)
        run.cancel()  # at an await: a step's verdicts are either all committed or none
        await asyncio.gather(run, return_exceptions=True)
        self.leaving.remove(loop)
        moving = self._move(loop.drain())
        log.warning("target %s %s; %s", address, why, self._where(moving))
        self._spawn(self._close(target, [s.seq_id for s in moving]))

    async def _lose_target(self, lost: TargetLost) -> None:
        """``lost.address`` stopped answering and its loop ended: its sequences move, and it is asked again until it
        answers (then it rejoins) or leaves the pool."""
        address = lost.address
        loop = self.loops.pop(address)
        target = self.targets.pop(address)
        self._runs.pop(address)
        moving = self._move(loop.drain())
        log.warning("%s; %s; asking it again until it answers", lost, self._where(moving))
        await target.link.close()
        self._ask_again(address)

    def _ask_again(self, address: str) -> None:
        """Asks a target that stopped or failed for its info, with backoff, until it answers and rejoins (while the
        pool still holds it)."""
        if address in self._wanted_targets and address not in self._joining_targets:
            self._join(self._joining_targets, address, self._join_target(address))

    def _move(self, seqs: list[LiveRequest]) -> list[LiveRequest]:
        """Places sequences whose target is gone on the others, to be re-prefilled there; those that moved
        --max-moves times already fail instead. Returns those that moved."""
        moving = []
        for seq in seqs:
            seq.moves += 1
            if seq.moves > self.config.max_moves:
                seq.fail(grpc.StatusCode.UNAVAILABLE, f"the request lost its target {seq.moves} times "
                         f"(--max-moves {self.config.max_moves})")
                continue
            seq.target_cached = 0  # the next target prefills it from its tokens
            moving.append(seq)
            self.place(seq)
        if moving:
            self.metrics.record_reprefills("target", len(moving))
        return moving

    def _where(self, moving: list[LiveRequest]) -> str:
        if self.loops:
            return f"{len(moving)} sequence(s) moved to the other {len(self.loops)} target(s)"
        return f"no target left: {len(moving)} sequence(s) wait up to {self.config.target_wait_s:.0f} s for one"

    def _give_up(self, seq: LiveRequest) -> None:
        self._give_ups.pop(seq.seq_id, None)
        if self.parked.pop(seq.seq_id, None) is seq and not seq.finished:
            log.warning("request %s waited %.0f s and no target came: UNAVAILABLE", seq.request_id,
                        self.config.target_wait_s)
            seq.fail(grpc.StatusCode.UNAVAILABLE,
                     f"no target replica could take the request within {self.config.target_wait_s:.0f} s")

    # -- drafts -----------------------------------------------------------------------------------

    async def _reconcile_drafts(self, pool: str, wanted: frozenset[str]) -> None:
        """Draft pool ``pool`` now holds ``wanted``. Joining and refused drafts are keyed "pool=address"."""
        wanted_keys = {f"{pool}={address}" for address in wanted}
        self._refused_drafts -= {k for k in self._refused_drafts if k.startswith(f"{pool}=")} - wanted_keys
        known = {f"{d.pool}={d.address}" for d in self.drafts}
        for address in sorted(wanted):
            key = f"{pool}={address}"
            if key not in known | self._joining_drafts.keys() | self._refused_drafts:
                self._join(self._joining_drafts, key, self._join_draft(pool, address))
        for key in sorted(k for k in self._joining_drafts if k.startswith(f"{pool}=") and k not in wanted_keys):
            self._joining_drafts.pop(key).cancel()
        for draft in [d for d in self.drafts if d.pool == pool and d.address not in wanted]:
            self._remove_draft(draft)

    async def _join_draft(self, pool: str, address: str) -> None:
        draft = connect_draft(address, pool, self.interceptors)
        if not await self._introduce(draft):
            return
        self.drafts.append(draft)
        unpinned = [session for s in self._sequences() if (session := s.sessions.get(pool)) is not None
                    and session.replica is None] if self.config.speculates else []
        for session in unpinned:
            session.replica, session.cached = self.pick_draft(pool), 0
        log.info("draft %s joined%s: %d draft(s)%s", address, self._pool_note(pool), len(self._pool(pool)),
                 f"; {len(unpinned)} sequence(s) draft on it" if unpinned else "")

    def _remove_draft(self, draft: DraftReplica) -> None:
        self.drafts.remove(draft)
        pinned = [(s, session) for s in self._sequences()
                  if (session := s.sessions.get(draft.pool)) is not None and session.replica is draft]
        for _, session in pinned:
            # The new draft re-prefills from the tokens; a step under way that still reports the old draft's cache
            # length is corrected by the new draft answering "unknown sequence".
            session.replica, session.cached = self.pick_draft(draft.pool), 0
        if pinned:
            self.metrics.record_reprefills("draft", len(pinned))
        others = len(self._pool(draft.pool))
        where = (f"{len(pinned)} sequence(s) moved to the other {others} draft(s)" if others
                 else f"no draft left: {len(pinned)} sequence(s) run at depth 0")
        log.warning("draft %s left%s; %s", draft.address, self._pool_note(draft.pool), where)
        self._spawn(self._close(draft, [s.seq_id for s, _ in pinned]))

    def _pool(self, pool: str) -> list[DraftReplica]:
        return [d for d in self.drafts if d.pool == pool]

    def _pool_note(self, pool: str) -> str:
        """" in draft pool P" when the router has several, so a log line says which."""
        return f" in draft pool {pool}" if len(self.pools) > 1 else ""

    # -- joining and leaving ----------------------------------------------------------------------

    def _join(self, joining: dict[str, asyncio.Task], address: str, introduce) -> None:
        task = asyncio.get_running_loop().create_task(introduce)
        joining[address] = task
        task.add_done_callback(lambda done: joining.pop(address) if joining.get(address) is done else None)

    async def _introduce(self, replica: TargetReplica | DraftReplica) -> bool:
        """Asks a new replica for its info until it answers (or leaves the pool: cancelled); False if it does not
        share the tokenizer."""
        wait = JOIN_RETRY_S[0]
        try:
            while True:
                try:
                    info = await replica.link.info(JOIN_TIMEOUT_S)
                    if info.draining:
                        raise ConnectionError(f"{replica.address} is shutting down")
                    replica.info = info
                    break
                except ConnectionError as err:
                    log.warning("%s; asking again in %.0f s", err, wait)
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, JOIN_RETRY_S[1])
            assert self.reference is not None
            is_target = isinstance(replica, TargetReplica)
            check_compatible([self.reference, replica] if is_target else [self.reference], [] if is_target
                             else [replica])
        except ValueError as err:
            log.error("not using %s: %s", replica.address, err)
            if is_target:
                self._refused_targets.add(replica.address)
            else:
                self._refused_drafts.add(f"{replica.pool}={replica.address}")
            await replica.link.close()
            return False
        except asyncio.CancelledError:
            await replica.link.close()
            raise
        return True

    async def _close(self, replica: TargetReplica | DraftReplica, seq_ids: list[str]) -> None:
        """Frees the moved sequences on a replica that may still be up (scaled down, not crashed), then closes
        its channel once calls under way have ended."""
        if seq_ids:
            with contextlib.suppress(ReplicaError, ReplicaGone):  # gone for good: nothing to free
                await replica.link.release(seq_ids, timeout_s=2)
        await asyncio.sleep(CLOSE_AFTER_S)
        await replica.link.close(grace_s=CLOSE_GRACE_S)

    def _sequences(self) -> Iterator[LiveRequest]:
        for loop in [*self.loops.values(), *self.leaving]:
            yield from loop.live
            yield from loop.waiting
        yield from self.parked.values()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
