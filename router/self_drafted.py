"""The self-drafted strategy (SPACE, lookahead, prompt lookup): the target proposes each sequence's next drafts with
its verdict, from the same forward pass or its text, so no draft service is called and drafting costs the step no call
of its own.

`propose` hands each sequence the candidates its last verdict brought (as many as the plan gives it) and asks the
target for as many for the step after (`Proposal.draft_next`); `settle` keeps what the verdicts bring. Candidates
are handed out once: a step that commits nothing (its target failed) leaves the next with none to verify, never with
candidates for positions that moved. A sequence's first step, or one after a plain step, verifies none and drafts
(`Proposal.first`); a verdict that proposed nothing (prompt lookup without a match) leaves the next step an empty
chain, which is a miss. A target that looks its candidates up after the pass (prompt lookup) is asked for as many as
it drafts at every step, plain ones included, so each step is planned with its candidates in hand: a sequence drafts
at most as many as it holds, and none where it holds none.
"""

from __future__ import annotations

from collections.abc import Mapping

from router.live_request import LiveRequest
from specfleet.policy.costs import SelfDrafting
from specfleet.speculation import Proposal, Proposals, StepPlan, Verdict

SELF_DRAFTED = "self"
"""The strategy's name (`LiveRequest.strategy`) on a router started with --self-draft."""
SPACE = SelfDrafting("space")
NO_CANDIDATES = Proposal(())  # what a verdict that proposed nothing leaves the next step


class SelfDrafted:
    def __init__(self, max_drafts: int, drafting: SelfDrafting = SPACE) -> None:
        self.max_drafts = max_drafts  # what the target said it drafts at most (GetInfo's max_draft_next)
        self.drafting = drafting  # how it drafts (GetInfo's self_drafting): the policy prices its steps by it
        self.candidates: dict[str, Proposal] = {}  # by seq_id: what its last verdict proposed
        self.asked: set[str] = set()  # the sequences the last `propose` asked the target to draft for

    def room(self, seq: LiveRequest) -> int | None:
        """Most drafts the sequence can verify this step: what the target drafts at most; with looked-up candidates,
        those in hand (its last verdict sent them: there are no others to verify, and none is a plain step)."""
        if self.drafting.looked_up:
            return len(self.candidates.get(seq.seq_id, NO_CANDIDATES).tokens)
        return self.max_drafts

    def candidates_in_hand(self, seq_id: str) -> bool:
        """Whether the sequence's drafts for this step are known before it is planned (looked-up candidates): the
        policy then prices them as offered, not by the sequence's offer rate."""
        return self.drafting.looked_up and bool(self.candidates.get(seq_id, NO_CANDIDATES).tokens)

    def holds_candidates(self, seq_id: str) -> bool:
        """Whether the sequence's last step asked the target for candidates for this one (it may have proposed
        none: a miss, not a first step)."""
        return seq_id in self.candidates

    async def propose(self, batch: list[LiveRequest], plan: StepPlan) -> Proposals:
        proposals = {}
        for seq in batch:
            held = self.candidates.pop(seq.seq_id, None)
            levels = plan.draft(seq.seq_id).levels
            if levels:
                tokens, top_k = (held.tokens[:levels], held.draft_top_k[:levels]) if held is not None else ((), ())
                # Looked-up candidates cost nothing to ask for: as many as the target drafts, whatever this step used.
                asked = self.max_drafts if self.drafting.looked_up else levels
                proposals[seq.seq_id] = Proposal(tokens, top_k, draft_next=asked, first=held is None)
            elif self.drafting.looked_up:  # a plain step: candidates for the next cost nothing to ask for
                proposals[seq.seq_id] = Proposal((), draft_next=self.max_drafts)
        self.asked = set(proposals)
        return Proposals(proposals)

    def settle(self, batch: list[LiveRequest], verdicts: Mapping[str, Verdict]) -> None:
        for seq in batch:
            verdict = verdicts.get(seq.seq_id)
            if verdict is not None and seq.seq_id in self.asked:
                self.candidates[seq.seq_id] = verdict.next_proposal or NO_CANDIDATES

    async def release(self, seqs: list[LiveRequest]) -> None:
        for seq in seqs:
            self.candidates.pop(seq.seq_id, None)
