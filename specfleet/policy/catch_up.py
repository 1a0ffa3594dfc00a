"""Pricing a drafter's catch-up: the tokens of a sequence a draft service does not hold, which it must compute before
it can draft for it.

A drafter that keeps a KV cache computes a sequence's whole prompt the first time it drafts for it, and the step (or,
with prompts computed alongside, the target computing the same prompt on the same cores) waits for it. That is paid
once, and drafting pays it back over the tokens the request has left, by as much as the depth policy predicts drafting
beats plain decoding. So a catch-up pays when

    cost = ms per prompt token x tokens behind  <=  saving = tokens left x (1 / plain goodput - 1 / drafting goodput)

both in the batch's wall time (goodputs in tokens per second of the whole batch: a sequence's tokens take their share
of each step). Priced per step, one step's goodput against the other's, no catch-up could ever pay: it is a one-time
cost against the rest of the request. The ms per prompt token is each drafter kind's own, measured by its draft
services (`PREFILL_ROLE` samples: a call's ms over the prompt tokens it computed, the median over calls). Until one
is measured, a catch-up is not priced and pays whenever drafting does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import median

from specfleet.policy.costs import PREFILL_ROLE, CostSample


@dataclass(frozen=True)
class CatchUp:
    """Some sequences' catch-up on one drafter, priced against what drafting saves them."""

    sequences: int
    tokens: int
    """The tokens the drafter lacks of them, in all."""
    remaining: int
    """The tokens they may still generate, in all."""
    cost_ms: float
    saving_ms: float

    @property
    def pays(self) -> bool:
        return self.cost_ms <= self.saving_ms

    def describe(self) -> str:
        """Why they draft, or not, for the step's reason."""
        who = "1 sequence" if self.sequences == 1 else f"{self.sequences} sequences"
        priced = (f"the draft's catch-up on {who} ({self.tokens} tokens, about {self.cost_ms:.0f} ms) against what "
                  f"drafting saves over their {self.remaining} tokens left (about {self.saving_ms:.0f} ms)")
        return f"{priced}: it pays" if self.pays else f"{priced}: they decode plainly"


def fit_prefill_rates(samples: Iterable[CostSample]) -> dict[str, float]:
    """Each drafter kind's ms per prompt token, from its `PREFILL_ROLE` samples: the median over calls of a call's ms
    over the prompt tokens it computed. A call that drafted after computing its prompts counts that drafting as the
    prompts' too, so the rate errs high, by a few decoding passes in hundreds of tokens. Samples that do not say
    their kind are filed under ""."""
    by_kind: dict[str, list[float]] = {}
    for sample in samples:
        tokens = sample.batch_size * sample.tokens_per_seq
        if sample.role == PREFILL_ROLE and tokens > 0:
            by_kind.setdefault(sample.drafter or "", []).append(sample.ms / tokens)
    return {kind: median(rates) for kind, rates in by_kind.items()}


def drafting_saving_ms(remaining_tokens: int, plain_goodput: float, drafting_goodput: float) -> float:
    """The batch wall time drafting saves over ``remaining_tokens`` at the predicted goodputs (tokens/s of the whole
    batch); 0 where drafting is no faster."""
    if plain_goodput <= 0 or drafting_goodput <= plain_goodput:
        return 0.0
    return remaining_tokens * 1000.0 * (1.0 / plain_goodput - 1.0 / drafting_goodput)


def price_catch_up(behind: Sequence[int], remaining: Sequence[int], ms_per_token: float, plain_goodput: float,
                   drafting_goodput: float) -> CatchUp:
    """The catch-up of sequences ``behind`` tokens each (what the drafter lacks of them), with ``remaining`` tokens
    each left to generate, at ``ms_per_token`` per prompt token, against the predicted goodputs (tokens/s of the
    whole batch) of plain decoding and of drafting."""
    if len(behind) != len(remaining):
        raise ValueError(f"behind and remaining must have one entry per sequence, got {len(behind)} and "
                         f"{len(remaining)}")
    if ms_per_token < 0:
        raise ValueError(f"ms_per_token must be >= 0, got {ms_per_token}")
    tokens, left = sum(behind), sum(remaining)
    return CatchUp(len(behind), tokens, left, ms_per_token * tokens,
                   drafting_saving_ms(left, plain_goodput, drafting_goodput))
