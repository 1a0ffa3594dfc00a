"""Prompt tokenisation off the event loop gives exactly the ids ``tokenizer.encode`` gives, whichever way it goes."""

from __future__ import annotations

import asyncio

import pytest

from router.tokenizing import LONG_PROMPT_BYTES, PromptTokenizer, same_ids_backend

TEXTS = ["", "hello world", "  leading spaces and\ttabs\n\nnew lines", "<s>special</s> tokens <|im_end|> in text",
         "déjà vu, 日本語, emoji \U0001f600", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"]


def _tokenizer(**kwargs):
    """A byte-level BPE trained here, with a BOS its post-processor adds and special tokens, as chat models have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog; def fib(n): return n"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|im_end|>"], **kwargs)


@pytest.mark.parametrize("split_special_tokens", [False, True])
def test_the_ids_are_those_of_encode(split_special_tokens: bool) -> None:
    tokenizer = _tokenizer(split_special_tokens=split_special_tokens)
    prompts = PromptTokenizer(tokenizer)
    for text in TEXTS:
        for add_special_tokens in (True, False):
            assert prompts.encode_now(text, add_special_tokens) == tokenizer.encode(
                text, add_special_tokens=add_special_tokens), (text, add_special_tokens)
    prompts.close()


def test_the_backend_is_used_only_where_it_encodes_as_the_tokenizer_does() -> None:
    tokenizer = _tokenizer()
    assert same_ids_backend(tokenizer) is tokenizer.backend_tokenizer
    tokenizer.backend_tokenizer.enable_truncation(4)  # encode() would switch it off first
    assert same_ids_backend(tokenizer) is None
    assert same_ids_backend(object()) is None  # not a Hugging Face fast tokenizer


def test_both_lanes_give_the_same_ids_as_encode() -> None:
    tokenizer = _tokenizer()
    prompts = PromptTokenizer(tokenizer)
    long_text = "the quick brown fox " * (LONG_PROMPT_BYTES // 20 + 1)

    async def tokenise() -> list[list[int]]:
        return await asyncio.gather(prompts.encode("hello world", 11), prompts.encode(long_text, len(long_text)))

    assert asyncio.run(tokenise()) == [tokenizer.encode("hello world"), tokenizer.encode(long_text)]
    prompts.close()
