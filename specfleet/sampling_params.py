"""Per-request sampling parameters, free of torch so that the router and the wire import them cheaply.

The tensor side (processed distributions, seeded sampling, the wire's top-K pairs) is `specfleet.sampling`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters, validated at construction."""

    temperature: float = 0.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most probable tokens; 0 turns it off."""
    top_p: float = 1.0
    """Keep the smallest set of most probable tokens whose mass is >= top_p (nucleus); 1 turns it off."""

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (temperature 0): the distribution is a point mass at the argmax."""
        return self.temperature == 0.0
