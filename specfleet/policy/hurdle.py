"""The drafting hurdle: a drafting plan, a depth plan or a tree budget alike, must beat plain decoding by a margin.

Every search finds its best plan first; `apply_hurdle` then decides whether plain decoding takes its place.
"""

from __future__ import annotations

from dataclasses import dataclass

DRAFT_HURDLE = 0.1
"""The smallest predicted gain over plain decoding for which the router drafts at all (its `min_gain`). A
prediction is a fit of noisy timings: where it promises a few percent the real sign can be either, and at large
batch such plans ran slower than plain decoding (measured in bench/adaptive.md). A fixed margin also holds back
some plans that would have gained, so the router first scales each predicted gain by how its own drafting steps
measured against their predictions (`calibration`)."""


@dataclass(frozen=True)
class HeldBack:
    """A drafting plan that gave way to plain decoding: its predicted gain, scaled by the calibration, was under
    the hurdle."""

    gain: float
    """The plan's predicted gain over plain decoding, after calibration (0.05: 5%)."""
    min_gain: float
    """The hurdle it did not clear."""
    calibration: float
    """The factor its predicted advantage was scaled by (1: as predicted)."""
    depths: tuple[int, ...] = ()
    """The depth plan held back; empty for a tree budget."""

    def note(self, what: str) -> str:
        """The reason's note, `what` naming the plan held back."""
        measured = "" if self.calibration == 1.0 else f" (x{self.calibration:.2f} as drafting steps measured)"
        return f"; {what} would gain {self.gain:.0%}{measured}, under the {self.min_gain:.0%} hurdle"


def check_hurdle(min_gain: float, calibration: float) -> None:
    """Raises ValueError unless min_gain >= 0 and calibration > 0."""
    if min_gain < 0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")
    if not calibration > 0:
        raise ValueError(f"calibration must be > 0, got {calibration}")


def apply_hurdle(advantage: float, min_gain: float, calibration: float, depths: tuple[int, ...] = ()
                 ) -> HeldBack | None:
    """Whether a drafting plan gives way to plain decoding: `HeldBack` if so, None if the plan stands.

    `advantage`: the plan's predicted score over plain decoding's, above 1 when it is better (goodput over
    goodput; in latency mode plain decoding's time per token over the plan's). The plan is held back when
    calibration * advantage - 1 < min_gain. With no hurdle and calibration 1 it always stands: the search
    already found it at least as good as plain decoding, which every search considers.
    """
    if min_gain == 0.0 and calibration == 1.0:
        return None
    gain = calibration * advantage - 1
    return HeldBack(gain, min_gain, calibration, depths) if gain < min_gain else None


def calibration_note(calibration: float) -> str:
    """The reason's note for a drafting plan chosen with a measured calibration ("" at 1)."""
    return "" if calibration == 1.0 else f"; gain x{calibration:.2f} as drafting steps measured"
