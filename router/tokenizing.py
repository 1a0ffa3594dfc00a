"""Prompt tokenisation and chat templating in worker threads, so that a long prompt never holds the event loop.

Hugging Face fast tokenizers release the GIL while they encode a batch, so the event loop (every other request's
stream) carries on while a long prompt is tokenised. Where it gives the same ids, the prompt goes straight to the
`tokenizers` object behind the tokenizer: ``transformers``' own ``encode`` then builds several lists of every id in
Python, which under load took longer than the encoding itself and held the GIL in long stretches. Long prompts have
a lane of their own: a few multi-megabyte prompts tokenising at once cannot delay the admission of ordinary ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

LONG_PROMPT_BYTES = 64 * 1024
"""Prompts from this size on take the long lane: they tokenise for tens of milliseconds or more, where a short
prompt takes well under one."""
SHORT_LANE_THREADS = 2
LONG_LANE_THREADS = 2  # more long prompts at once would take the cores the event loop and the step loops need

T = TypeVar("T")


class PromptTokenizer:
    """Turns prompt text (or chat messages, through the model's chat template) into token ids off the event loop."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._backend = same_ids_backend(tokenizer)
        self._short = ThreadPoolExecutor(SHORT_LANE_THREADS, thread_name_prefix="tokenize")
        self._long = ThreadPoolExecutor(LONG_LANE_THREADS, thread_name_prefix="tokenize-long")

    async def encode(self, text: str, size: int) -> list[int]:
        """The token ids of ``text`` (``size`` its length in bytes, which picks the lane)."""
        return await self._run(size, self.encode_now, text)

    async def encode_chat(self, messages: list[dict[str, str]], size: int) -> list[int]:
        """The token ids of ``messages`` rendered with the chat template, ready for the assistant's turn (``size``
        the bytes of their contents)."""
        return await self._run(size, self._render_and_encode, messages)

    def close(self) -> None:
        """Stops the worker threads once the tokenisations under way are done; later calls raise RuntimeError."""
        self._short.shutdown(wait=False, cancel_futures=True)
        self._long.shutdown(wait=False, cancel_futures=True)

    def encode_now(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of ``text``, as ``tokenizer.encode`` gives them, in this thread."""
        if self._backend is None:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        # The batch call: the single one holds the GIL throughout. The fast one leaves out the character offsets.
        return self._backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def _render_and_encode(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode_now(text, add_special_tokens=False)

    async def _run(self, size: int, work: Callable[..., T], *args: Any) -> T:
        lane = self._long if size >= LONG_PROMPT_BYTES else self._short
        return await asyncio.get_running_loop().run_in_executor(lane, work, *args)


def same_ids_backend(tokenizer: Any) -> Any:
    """The `tokenizers` object behind a Hugging Face fast ``tokenizer`` when it encodes as ``tokenizer.encode`` does
    (no truncation or padding set, special tokens in the text read as ``tokenizer`` reads them), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    if bool(getattr(tokenizer, "split_special_tokens", False)) != backend.encode_special_tokens:
        return None
    return backend
