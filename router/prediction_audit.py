"""Predicted against measured: how far the depth policy's step predictions are from what its steps did.

The policy picks depths by predicted goodput, expected emitted tokens over predicted step time. The step loop
adds the prediction each step acted on and what the step then took and emitted, apart for steps that drafted
and steps that decoded plainly: a model that misprices drafting alone is the one that picks wrong depths, and
both ratios near 1.00 say the choices rest on sound numbers. The decision log reports the ratios since its last
line. Steps that prefill a prompt go apart again: the cost model leaves prefill out, so their time is over
the prediction by the prompt's cost, but what the policy chose in them still counts. `Calibration` keeps the same
comparison per batch size over recent steps, for the drafting hurdle to act on, and `ContentionFit` measures how much
a draft made ahead and the verify beside it slow each other where they share CPU cores.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from statistics import median

from specfleet.stats import StepStats

log = logging.getLogger("specfleet.router")


@dataclass
class Tally:
    """Sums over a kind of step: all of them since the last report (the audit), or each older step counting a
    little less (the calibration)."""

    steps: int = 0  # all of them, whatever their weight
    predicted_ms: float = 0.0
    measured_ms: float = 0.0
    predicted_tokens: float = 0.0
    emitted_tokens: float = 0.0

    def add(self, predicted_ms: float, measured_ms: float, predicted_tokens: float, emitted_tokens: int,
            keep: float = 1.0) -> None:
        """One step; the sums so far count ``keep`` times (1: a plain sum)."""
        self.steps += 1
        self.predicted_ms = keep * self.predicted_ms + predicted_ms
        self.measured_ms = keep * self.measured_ms + measured_ms
        self.predicted_tokens = keep * self.predicted_tokens + predicted_tokens
        self.emitted_tokens = keep * self.emitted_tokens + emitted_tokens

    def goodput_ratio(self) -> float:
        """Measured over predicted goodput: (emitted / predicted tokens) / (measured / predicted time)."""
        return self.token_ratio() / self.time_ratio()

    def time_ratio(self) -> float:
        return self.measured_ms / self.predicted_ms if self.predicted_ms > 0 else float("nan")

    def token_ratio(self) -> float:
        return self.emitted_tokens / self.predicted_tokens if self.predicted_tokens > 0 else float("nan")

    def describe(self, kind: str) -> str:
        return (f"{self.steps} {kind} step{'s' if self.steps != 1 else ''} took {self.time_ratio():.2f}x the "
                f"predicted time and emitted {self.token_ratio():.2f}x the predicted tokens")


KINDS = ("drafting", "plain", "prefilling drafting", "prefilling plain")
"""Steps by whether any sequence drafted; steps that also prefill a prompt apart (the cost model leaves their
prefill out, so their time is over its prediction by the prompt's cost: counted, not blamed on the model)."""


@dataclass
class PredictionAudit:
    tallies: dict[str, Tally] = field(default_factory=lambda: {kind: Tally() for kind in KINDS})

    def add(self, drafted: bool, predicted_ms: float, measured_ms: float, predicted_tokens: float,
            emitted_tokens: int, prefilled: bool = False) -> None:
        """One step: whether any sequence drafted, the predicted and measured ms, the expected and emitted tokens,
        and whether it prefilled a prompt."""
        tally = self.tallies[("prefilling " if prefilled else "") + ("drafting" if drafted else "plain")]
        tally.add(predicted_ms, measured_ms, predicted_tokens, emitted_tokens)

    def observe(self, stats: StepStats) -> None:
        """A step the policy made a prediction for."""
        if stats.predicted_ms > 0:
            self.add(stats.drafted, stats.predicted_ms, stats.duration_s * 1000, stats.predicted_tokens, stats.emitted,
                     prefilled=stats.prefilled)

    @property
    def drafting(self) -> Tally:
        return self.tallies["drafting"]

    @property
    def plain(self) -> Tally:
        return self.tallies["plain"]

    def report(self) -> str:
        """"" when no step was audited since the last report; else one part per kind of step. Starts over."""
        parts = [t.describe(kind) for kind, t in self.tallies.items() if t.steps]
        self.tallies = {kind: Tally() for kind in KINDS}
        return "; ".join(parts)


class Calibration:
    """How far the policy's drafting predictions miss, measured on this router's own steps: the correction the
    drafting hurdle applies to a plan's predicted gain over plain decoding.

    Per batch size (to the nearest power of two), over the last ``half_life`` steps or so of each kind: measured
    over predicted goodput of the steps that drafted, divided by the same for the steps that decoded plainly. The
    cost model fits each cell's median, but a drafting step's real cost also holds what the cells do not: the
    ragged rows' padding, the extra round trip in a busy step, and the optimism of a plan chosen because its
    prediction came out high; its emitted tokens likewise follow runs of matches that per-sequence rates average
    away. These misses differ by batch size and machine, optimistic at one batch size and pessimistic at another
    (measured in bench/adaptive.md), so a fixed hurdle cannot absorb them. Plain steps in the denominator cancel
    what both kinds share (a machine running slow as a whole). Steps that prefill a prompt stay out: their
    prediction leaves the prefill out.

    1.0 (no correction) until a batch size has at least ``min_steps`` of each kind; clamped to
    [``1 / max_factor``, ``max_factor``]. Only drafting steps move the drafting side, so a correction that holds
    drafting back would never be measured again: a batch size that has decoded ``half_life`` steps in a row
    plainly forgets its drafting steps, the policy's own prediction decides again, and if it drafts, fresh
    drafting steps renew the correction. Without that, a few early drafting steps (a cold cost model, drafters
    still prefilling) could hold a router at plain decoding for good where drafting pays (seen on a llama.cpp
    target: held back as 1% worse, measured 16% better).
    """

    def __init__(self, half_life: int = 100, min_steps: int = 8, max_factor: float = 2.0) -> None:
        if half_life < 1 or min_steps < 1 or max_factor < 1:
            raise ValueError(f"need half_life >= 1, min_steps >= 1 and max_factor >= 1, got {half_life}, "
                             f"{min_steps}, {max_factor}")
        self.keep = 0.5 ** (1.0 / half_life)
        self.half_life = half_life
        self.min_steps = min_steps
        self.max_factor = max_factor
        self._sums: dict[tuple[int, bool], Tally] = {}
        self._plain_run: dict[int, int] = {}  # per batch size bucket: plain steps since its last drafting step

    @staticmethod
    def bucket(batch_size: int) -> int:
        """The power of two nearest ``batch_size`` (in log terms): 12-22 all count as 16."""
        return 1 << max(0, round(math.log2(batch_size)))

    def observe(self, stats: StepStats) -> None:
        """A step the policy made a prediction for, unless it prefilled a prompt."""
        if stats.predicted_ms > 0 and not stats.prefilled:
            self.add(stats.batch_size, stats.drafted, stats.predicted_ms, stats.duration_s * 1000,
                     stats.predicted_tokens, stats.emitted)

    def add(self, batch_size: int, drafted: bool, predicted_ms: float, measured_ms: float,
            predicted_tokens: float, emitted_tokens: int) -> None:
        """One step that did not prefill, as `PredictionAudit.add` takes it."""
        if predicted_ms <= 0 or measured_ms <= 0 or predicted_tokens <= 0:
            return
        bucket = self.bucket(batch_size)
        sums = self._sums.setdefault((bucket, drafted), Tally())
        sums.add(predicted_ms, measured_ms, predicted_tokens, emitted_tokens, keep=self.keep)
        self._plain_run[bucket] = 0 if drafted else self._plain_run.get(bucket, 0) + 1
        if self._plain_run[bucket] >= self.half_life and (bucket, True) in self._sums:
            forgotten = self.factor(batch_size)
            del self._sums[bucket, True]
            log.log(logging.INFO if forgotten < 1.0 else logging.DEBUG,
                    "batch %d: %d plain steps since the last drafting step; its drafting correction x%.2f is "
                    "forgotten, to be measured again", bucket, self._plain_run[bucket], forgotten)

    def factor(self, batch_size: int) -> float:
        bucket = self.bucket(batch_size)
        drafting, plain = self._sums.get((bucket, True)), self._sums.get((bucket, False))
        if drafting is None or plain is None or min(drafting.steps, plain.steps) < self.min_steps:
            return 1.0
        if plain.emitted_tokens <= 0:  # nothing to compare against (a step emits a token per live sequence)
            return 1.0
        ratio = drafting.goodput_ratio() / plain.goodput_ratio()
        return min(self.max_factor, max(1.0 / self.max_factor, ratio))


class ContentionFit:
    """How much a draft made ahead and the verify beside it slow each other, measured on this router's steps: the
    `StepCosts.ahead_contention` that prices them at the times they took.

    Where a draft service computes on the target's CPU cores, neither extreme holds: the two do not take turns (the
    cores are not both busy all the time, and the verify's own samples were measured beside drafts made ahead, so
    already hold part of the slowdown), nor do they overlap for free. Each step that drafted ahead gives the contention
    that would have priced it exactly (`AheadOverlap.measured_contention`); the estimate is the median of the last
    ``window`` of them, in [0, 1], once ``min_steps`` are in. Steps that prefill a prompt stay out (their prediction
    leaves the prefill out)."""

    def __init__(self, window: int = 64, min_steps: int = 8) -> None:
        if window < 1 or not 1 <= min_steps <= window:
            raise ValueError(f"need window >= 1 and 1 <= min_steps <= window, got {window}, {min_steps}")
        self.min_steps = min_steps
        self._measured: deque[float] = deque(maxlen=window)

    def observe(self, stats: StepStats) -> None:
        """A step: counted where it drafted ahead, was predicted and prefilled nothing."""
        if stats.overlap is None or stats.predicted_ms <= 0 or stats.prefilled:
            return
        measured = stats.overlap.measured_contention(stats.predicted_ms, stats.duration_s * 1000)
        if measured is not None:
            self._measured.append(measured)

    def estimate(self) -> float | None:
        """The measured contention, in [0, 1]; None until ``min_steps`` steps drafted ahead."""
        if len(self._measured) < self.min_steps:
            return None
        return min(1.0, max(0.0, median(self._measured)))
