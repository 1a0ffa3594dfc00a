"""Predicted against measured: how far the depth policy's step predictions are from what its steps did.

The policy picks depths by predicted goodput, expected emitted tokens over predicted step time. The step loop
adds the prediction each step acted on and what the step then took and emitted, apart for steps that drafted
and steps that decoded plainly: a model that misprices drafting alone is the one that picks wrong depths, and
both ratios near 1.00 say the choices rest on sound numbers. The decision log reports the ratios since its last
line. Steps that prefill a prompt go apart again: the cost model leaves prefill out, so their time is over
the prediction by the prompt's cost, but what the policy chose in them still counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Tally:
    """Sums over a kind of step since the last report."""

    steps: int = 0
    predicted_ms: float = 0.0
    measured_ms: float = 0.0
    predicted_tokens: float = 0.0
    emitted_tokens: int = 0

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
        tally.steps += 1
        tally.predicted_ms += predicted_ms
        tally.measured_ms += measured_ms
        tally.predicted_tokens += predicted_tokens
        tally.emitted_tokens += emitted_tokens

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
