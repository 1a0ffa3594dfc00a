"""Turning generated token ids into streamed text: incremental detokenization and stop strings."""

from __future__ import annotations

import bisect
from collections import deque
from typing import Any


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids without decoding everything each time.

    Decodes a short window before the new tokens so merges across token boundaries come out right,
    and holds back text that ends in an incomplete UTF-8 character (decoded as U+FFFD).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, new_tokens: list[int]) -> str:
        self.tokens.extend(new_tokens)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset: self.read_offset], skip_special_tokens=True)
        full = decode(self.tokens[self.prefix_offset:], skip_special_tokens=True)
        if full.endswith("\ufffd") or len(full) < len(prefix):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        return full[len(prefix):]


class StopMatcher:
    """Finds the first stop string in streamed text and says how much text is safe to emit.

    A step costs about its new text plus one search per stop string over the new text and the longest stop's
    length before it, however long the text grows: only the end of the text is kept (what is not emitted yet, and
    the window a stop can start in), and the text held back is found from the places it could start, each looked
    at once or a few times.
    """

    def __init__(self, stops: list[str]) -> None:
        # Sorted: the stops that start with a given text lie next to each other (see `_starts_longer_stop`).
        self.stops = sorted({s for s in stops if s})
        self.first_chars = frozenset(s[0] for s in self.stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # the end of the text seen so far, from ``start`` on
        self.start = 0  # where ``text`` begins in the whole text
        self.emitted = 0  # characters of the whole text already handed out
        # Places in the whole text, in order, where an end of the text that could still grow into a stop string may
        # start: a stop's first character there. A place that stops being one never becomes one again (the text
        # only grows), so places are dropped from the front for good.
        self.candidates: deque[int] = deque()

    def feed(self, delta: str) -> tuple[str, bool]:
        """Adds ``delta``; returns (text now safe to emit, whether a stop string was found)."""
        end_before = self.start + len(self.text)
        search_from = max(0, end_before - self.longest) - self.start
        self.text += delta
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            return self._emit_until(self.start + min(hits)), True
        # Only the last (longest - 1) characters can start a stop string the text has not finished yet.
        nearest = max(0, len(delta) - self.longest + 1)
        self.candidates.extend(end_before + k for k in range(nearest, len(delta)) if delta[k] in self.first_chars)
        out = self._emit_until(self.start + len(self.text) - self._held_back())
        self._forget_emitted()
        return out, False

    def flush(self) -> str:
        return self._emit_until(self.start + len(self.text))

    def _emit_until(self, end: int) -> str:
        out = self.text[self.emitted - self.start: end - self.start] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def _forget_emitted(self) -> None:
        """Drops the text that is emitted and that no stop string found later can start in."""
        keep_from = max(self.start, min(self.emitted, self.start + len(self.text) - self.longest))
        self.text = self.text[keep_from - self.start:]
        self.start = keep_from

    def _held_back(self) -> int:
        """Length of the longest end of the text that could still grow into a stop string."""
        end = self.start + len(self.text)
        while self.candidates:
            place = self.candidates[0]
            # Too far from the end first: such a place may lie before ``start``, in text already dropped.
            if end - place < self.longest and self._starts_longer_stop(self.text[place - self.start:]):
                return end - place
            self.candidates.popleft()
        return 0

    def _starts_longer_stop(self, tail: str) -> bool:
        """Whether a stop string longer than ``tail`` starts with it."""
        # The stops that start with ``tail`` come first among those >= it in sorted order, ``tail`` itself first.
        at = bisect.bisect_left(self.stops, tail)
        return any(stop.startswith(tail) and len(stop) > len(tail) for stop in self.stops[at: at + 2])
