"""The target's own weights draft over a StreamingLLM cache (MagicDec): cheap at any context length, and close to
the target, since it is the target with the keys outside the sinks and the window masked out."""

from __future__ import annotations

from specfleet.drafters.model import ModelDrafter


class SparseSelfDrafter(ModelDrafter):
    """A ``ModelDrafter`` over a `specfleet.engine.streaming.StreamingRunner` loaded with the target's model: chains
    and trees alike, each sequence's draft cache bounded by ``runner.window.capacity`` entries whatever its length."""

    kind = "sparse_self"
