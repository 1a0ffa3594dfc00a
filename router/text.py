"""Turning generated token ids into streamed text: incremental detokenization and stop strings."""

from __future__ import annotations

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
    """Finds the first stop string in streamed text and says how much text is safe to emit."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # all text seen so far
        self.emitted = 0  # characters of it already handed out

    def feed(self, delta: str) -> tuple[str, bool]:
        """Adds ``delta``; returns (text now safe to emit, whether a stop string was found)."""
        search_from = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += delta
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.emitted: end] if end > self.emitted else ""
            self.emitted = max(self.emitted, end)
            return out, True
        safe = len(self.text) - self._held_back()
        out = self.text[self.emitted: safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that could still grow into a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
