"""Keeps the router's depth policy fed from fleet telemetry, off the step loop's hot path.

Every ``refresh_s`` a background task reads the recent window from Redis and refits the policy, both in a worker
thread, so neither a slow Redis nor the fit delays a step. When Redis cannot be read the policy keeps its
last fitted model (the built-in defaults at start); the change is logged once each way.

A router that has not stepped since its last refit has no use for a new one: it refits every
``IDLE_REFRESH_S`` instead (so `GetServerInfo` stays current), and at once when its next step is decided. Many
idle routers on one fleet then cost Redis and the CPU next to nothing. While Redis is unreachable the
feed keeps trying every ``refresh_s``, busy or not, to notice its return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from specfleet.policy import DepthPolicy
from specfleet.telemetry import TelemetrySource

log = logging.getLogger("specfleet.router")

IDLE_REFRESH_S = 10.0


class PolicyFeed:
    def __init__(self, policy: DepthPolicy, source: TelemetrySource | None, refresh_s: float, mode: str) -> None:
        self.policy = policy
        self.source = source
        self.refresh_s = refresh_s
        self.mode = mode
        self.redis_up = False
        self.refreshes = 0
        self.fleet_sequence_steps = 0
        self.last_decision = ""
        self._warned = False
        self._stepped = asyncio.Event()  # set by every decision; cleared at each refit

    async def run(self) -> None:
        if self.source is None:
            log.info("no --redis-url: the depth policy uses its built-in cost defaults and this router's acceptance")
            return
        while True:
            self._stepped.clear()
            await self.refresh()
            await asyncio.sleep(self.refresh_s)
            if self.redis_up and not self._stepped.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stepped.wait(), max(0.0, IDLE_REFRESH_S - self.refresh_s))

    def record_decision(self, summary: str) -> None:
        """The step loop's latest choice, for `GetServerInfo`; it also marks the router busy (see the module doc)."""
        self.last_decision = summary
        self._stepped.set()

    async def refresh(self) -> None:
        view = await asyncio.to_thread(self.source.read)
        if view is None:
            if not self._warned:
                log.warning("Redis telemetry unreachable: the depth policy keeps its last fitted model until it "
                            "returns")
                self._warned = True
            self.redis_up = False
            return
        if self._warned:
            log.info("Redis telemetry is back: the depth policy refits again")
            self._warned = False
        self.redis_up = True
        acceptance = view.acceptance
        # The refit is tens of milliseconds of Python over the whole window: in a worker thread, it delays the
        # event loop (the steps, the streams, admission's answers) by a GIL switch at most, not by all of it.
        kinds = view.acceptance_by_drafter
        await asyncio.to_thread(self.policy.update, view.samples, acceptance.first_accepted, acceptance.rejections,
                                acceptance.offers, acceptance.misses, acceptance.later_siblings_accepted,
                                acceptance.later_siblings_rejected,
                                {kind: (counts.first_accepted, counts.rejections) for kind, counts in kinds.items()},
                                {kind: (counts.offers, counts.misses) for kind, counts in kinds.items()})
        self.refreshes += 1
        self.fleet_sequence_steps = view.acceptance.sequence_steps
