"""Streaming text: incremental detokenization and stop strings."""

from __future__ import annotations

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
