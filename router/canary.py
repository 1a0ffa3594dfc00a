"""The losslessness canary: a share of finished greedy requests is generated again, in the background, by plain
decoding on the same targets, and the two answers compared.

Speculation must never change a greedy answer; a bug in a kernel, a ragged batch or a rollback that does shows up
as a mismatch here long before a user notices. Replays run only while the targets have room (nothing waiting and
at most half the slots busy), one at a time, and never delay a client: when the fleet is busy, requests are not
sampled. A mismatch is counted (`specfleet_canary_mismatches_total`), logged with the first differing position and
both continuations from there, and marked on a span.

The target's kernels are not batch-invariant: in another batch a logit can move in its last bits, so where the two
best tokens nearly tie the replay may take the other one. A rare mismatch on a model whose greedy choices have
near-ties is therefore not proof of a bug; a rate that grows with drafting is.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from router.live_request import FinishReason, LiveRequest, StreamError
from router.text import IncrementalDetokenizer, StopMatcher
from specfleet.sampling_params import SamplingParams

log = logging.getLogger("specfleet.router")

SHOWN_TOKENS = 16  # of each continuation after the first difference, in the log line


@dataclass(frozen=True)
class Replay:
    """What is replayed of a finished request: its prompt, its answer, and how it was asked."""

    request_id: str
    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    eos_ids: frozenset[int]
    ignore_eos: bool

    @classmethod
    def of(cls, seq: LiveRequest) -> Replay | None:
        """The replay of ``seq``, or None when it is not a greedy request that ran to its own end."""
        if not seq.sampling.greedy or seq.error is not None or seq.cancelled:
            return None
        ended = (FinishReason.EOS, FinishReason.LENGTH, FinishReason.STOP)
        if seq.finish_reason not in ended or len(seq.tokens) == seq.prompt_len:
            return None
        return cls(seq.request_id, tuple(seq.tokens[:seq.prompt_len]), tuple(seq.tokens[seq.prompt_len:]),
                   seq.eos_ids, seq.ignore_eos)


def first_difference(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int | None:
    """The first position where ``a`` and ``b`` differ (one ending before the other counts), or None."""
    for position, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return position
    return None if len(a) == len(b) else min(len(a), len(b))


class Canary:
    """Replays a ``share`` of finished greedy requests through ``place`` (the fleet's) while ``has_room()``."""

    def __init__(self, share: float, place: Callable[[LiveRequest], None], has_room: Callable[[], bool],
                 tokenizer: object, on_result: Callable[[bool, Replay, int | None], None],
                 choose: Callable[[], float] = random.random, timeout_s: float = 300.0) -> None:
        self.share = share
        self.place = place
        self.has_room = has_room
        self.tokenizer = tokenizer
        self.on_result = on_result  # (matched, replay, first difference): the metrics and the trace
        self.choose = choose
        self.timeout_s = timeout_s
        self.replays = 0
        self.mismatches = 0
        self._busy = False
        self._counter = 0
        self._tasks: set[asyncio.Task] = set()

    def consider(self, seq: LiveRequest) -> None:
        """Called as each request ends: replays it now and then, if it qualifies and the targets have room."""
        if self.share <= 0 or self._busy or self.choose() >= self.share or not self.has_room():
            return
        replay = Replay.of(seq)
        if replay is None:
            return
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._run(replay, seq.seq_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, replay: Replay, seq_id: str) -> None:
        try:
            self._counter += 1
            plain = LiveRequest(
                request_id=f"canary-{replay.request_id}", seq_id=f"{seq_id}-canary-{self._counter}",
                tokens=list(replay.prompt), prompt_len=len(replay.prompt), sampling=SamplingParams(), seed=0,
                max_new_tokens=len(replay.answer), eos_ids=replay.eos_ids, ignore_eos=replay.ignore_eos,
                detokenizer=IncrementalDetokenizer(self.tokenizer), stops=StopMatcher([]))
            self.place(plain)  # no draft: plain decoding
            again = await asyncio.wait_for(_answer(plain), self.timeout_s)
        except (TimeoutError, ConnectionError) as err:
            log.info("canary replay of %s gave up: %s", replay.request_id, err)
            return
        finally:
            self._busy = False
        difference = first_difference(replay.answer, again)
        self.replays += 1
        if difference is not None:
            self.mismatches += 1
            log.error("canary: request %s differs from plain decoding at generated token %d of %d: speculative %s, "
                      "plain %s", replay.request_id, difference, len(replay.answer),
                      list(replay.answer[difference:difference + SHOWN_TOKENS]),
                      list(again[difference:difference + SHOWN_TOKENS]))
        self.on_result(difference is None, replay, difference)


async def _answer(seq: LiveRequest) -> list[int]:
    """The replay's tokens once it ends."""
    while True:
        chunk = await seq.outbox.get()
        if isinstance(chunk, StreamError):
            raise ConnectionError(chunk.message)
        if chunk.finish_reason is not None:
            return seq.generated
