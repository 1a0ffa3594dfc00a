"""Where two token sequences part: what a cache, a session or a draft made ahead still shares with a new context."""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix_length(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """How many leading tokens ``a`` and ``b`` share (at most ``limit``)."""
    n = min(len(a), len(b)) if limit is None else max(0, min(len(a), len(b), limit))
    if a[:n] == b[:n]:  # the usual case, compared in C: a context that extends what is held
        return n
    return next(i for i in range(n) if a[i] != b[i])
