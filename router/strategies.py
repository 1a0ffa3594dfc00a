"""Several speculation strategies in one batch: each sequence drafts from its own (``LiveRequest.strategy``).

A strategy is a `router.ports.Proposer`. Where its drafts come from is its own business:
- a separate drafter (`router.draft_pool.DraftPool`): a pool of draft services, called each step;
- drafted ahead: the drafter drafts step t+1 while the target verifies step t, continuing from step t's
  drafts as if all were accepted, and `propose` hands over what still follows the committed tokens;
- self-drafted: the target returns the next step's candidates with its verdict (`Verdict.next_proposal`,
  asked for with `Proposal.draft_next`), which `settle` keeps for the next `propose`; no draft service is called.
The step loop calls this composite as it would one strategy; it asks each strategy for its own sequences, all
in parallel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from router.live_request import LiveRequest
from router.ports import Proposer
from specfleet.speculation import Proposals, StepPlan, Verdict


class Strategies:
    def __init__(self, strategies: Mapping[str, Proposer]) -> None:
        if not strategies:
            raise ValueError("need at least one speculation strategy")
        self.strategies = dict(strategies)

    def room(self, seq: LiveRequest, strategy: str | None = None) -> int | None:
        """As `Proposer.room`, with ``strategy`` (its own when None), whichever it drafts with now."""
        found = self.strategies.get(seq.strategy if strategy is None else strategy)
        return 0 if found is None else found.room(seq)

    async def propose(self, batch: list[LiveRequest], plan: StepPlan) -> Proposals:
        groups = self._groups(batch)
        if len(groups) == 1:  # the usual case: one strategy serves the whole batch
            (name, seqs), = groups.items()
            return await self.strategies[name].propose(seqs, plan)
        results = await asyncio.gather(*(self.strategies[name].propose(seqs, plan) for name, seqs in groups.items()))
        return Proposals({seq_id: p for result in results for seq_id, p in result.items()},
                         max((result.compute_ms for result in results), default=0.0))

    def settle(self, batch: list[LiveRequest], verdicts: Mapping[str, Verdict]) -> None:
        for name, seqs in self._groups(batch).items():
            self.strategies[name].settle(seqs, verdicts)

    async def release(self, seqs: list[LiveRequest]) -> None:
        """Every strategy forgets the finished sequences it may hold: each that drafted in a pool keeps a session
        there whichever strategy it used last."""
        groups = {name: [s for s in seqs if name == s.strategy or name in s.sessions] for name in self.strategies}
        await asyncio.gather(*(self.strategies[name].release(group) for name, group in groups.items() if group))

    def _groups(self, seqs: list[LiveRequest]) -> dict[str, list[LiveRequest]]:
        groups: dict[str, list[LiveRequest]] = {}
        for seq in seqs:
            if not seq.sessions and seq.strategy not in self.strategies:
                continue  # no draft session anywhere: it decodes plainly (a canary replay, a router without drafts)
            groups.setdefault(seq.strategy, []).append(seq)
        unknown = sorted(groups.keys() - self.strategies.keys())
        if unknown:
            raise ValueError(f"{groups[unknown[0]][0].seq_id} drafts with {unknown[0]!r}, which this router does not "
                             f"run (it runs {sorted(self.strategies)})")
        return groups
