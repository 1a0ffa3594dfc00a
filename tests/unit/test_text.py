"""Streaming text: incremental detokenization and stop strings."""

from __future__ import annotations

import random
import time

import pytest

from router.text import StopMatcher


def test_stop_string_cuts_text_and_holds_back_prefixes() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("hello E") == ("hello ", False)  # "E" might start "END"
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("D and more") == ("", True)


def test_stop_string_split_text_emitted_before_it() -> None:
    matcher = StopMatcher(["\n\n"])
    out, stopped = matcher.feed("line one\n")
    assert (out, stopped) == ("line one", False)
    out, stopped = matcher.feed("\nline two")
    assert (out, stopped) == ("", True)


def test_no_stop_strings_passes_everything() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.flush() == ""


def test_flush_releases_held_back_text_at_the_end() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("ends with ST") == ("ends with ", False)
    assert matcher.flush() == "ST"


class StraightforwardStopMatcher:
    """The matcher as first written: every stop searched in the whole recent text, every prefix of every stop tried
    for the held-back text. Clear, and the reference `StopMatcher` must agree with."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        search_from = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += delta
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.emitted: end] if end > self.emitted else ""
            self.emitted = max(self.emitted, end)
            return out, True
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        safe = len(self.text) - longest
        out = self.text[self.emitted: safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


def _stream(matcher, deltas: list[str]) -> list[tuple[str, bool] | str]:
    """What ``matcher`` hands out for ``deltas``, up to the first stop string (or the flush at the end)."""
    said: list[tuple[str, bool] | str] = []
    for delta in deltas:
        said.append(matcher.feed(delta))
        if said[-1][1]:
            return said
    return [*said, matcher.flush()]


def test_stop_matcher_agrees_with_the_straightforward_one_on_random_streams() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        alphabet = rng.choice(["ab", "abc", "ab\n", "xyz "])
        stops = ["".join(rng.choices(alphabet, k=rng.randint(0, 7))) for _ in range(rng.randint(0, 5))]
        deltas = ["".join(rng.choices(alphabet, k=rng.randint(0, 9))) for _ in range(rng.randint(1, 30))]
        assert _stream(StopMatcher(stops), deltas) == _stream(StraightforwardStopMatcher(stops), deltas), \
            (stops, deltas)


def test_stop_matcher_agrees_with_the_straightforward_one_on_many_long_stops() -> None:
    rng = random.Random(11)
    for _ in range(20):
        text = "".join(rng.choices("ab", k=600))
        # Stops cut from the text itself, so that many prefixes of them end the text along the way.
        stops = [text[i: i + rng.randint(20, 120)] + rng.choice(["", "c"]) for i in rng.sample(range(500), 40)]
        cuts = sorted(rng.sample(range(1, len(text)), 150))
        deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert _stream(StopMatcher(stops), deltas) == _stream(StraightforwardStopMatcher(stops), deltas)


@pytest.mark.parametrize("stop_body", ["a" * 998, "b" * 998], ids=["window-held-back", "last-held-back"])
def test_many_long_stop_strings_cost_little_per_step(stop_body: str) -> None:
    # 1000 stops of 1000 characters over 2000 steps. The text is the worst case: every place in it holds the stops'
    # first character, and either the whole window could still grow into a stop, or only its last character can
    # (every other place is tried and fails; the straightforward matcher takes half a second a step on this one).
    stops = ["a" + stop_body + chr(0x100 + i) for i in range(1000)]
    matcher = StopMatcher(stops)
    started = time.perf_counter()
    for _ in range(2000):
        assert not matcher.feed("aaaa")[1]
    elapsed = time.perf_counter() - started
    assert matcher.flush() == ("a" * 999 if stop_body.startswith("a") else "a")
    assert len(matcher.text) < 2100  # only the end of the text is kept
    assert elapsed < 5.0, f"{elapsed:.1f} s for 2000 steps"
