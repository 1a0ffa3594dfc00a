"""Sampled chain verification with a sparse self-draft's q reproduces the target's distribution.

A tiny random Llama over `VOCAB` tokens is the target; the same weights over a StreamingLLM cache (one sink, a
two-token window) are the draft, after a prompt long enough that the window hides most of it, so q really differs
from p. Their next-token distributions after the prompt and after each one-token continuation fill the tables of
`test_verify`'s harness, which runs the speculative procedure 30k times and compares the first two tokens with the
target's exact joint (chi-square); the same harness catches the broken verifiers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_verify import (
    VOCAB,
    ToyModels,
    _always_accept,
    _chi_square_pvalue,
    _first_two_tokens,
    _params,
    _residual_is_target,
)
from transformers import AutoModelForCausalLM, LlamaConfig

from specfleet.engine import Extend, ModelRunner
from specfleet.engine.runner import load_model
from specfleet.engine.streaming import StreamingRunner, StreamingWindow
from specfleet.sampling import processed_probs
from specfleet.verify import verify_chain

PROMPT = [3, 1, 4, 1, 5, 2, 6, 5, 3, 5, 7, 2]
WINDOW = StreamingWindow(sinks=1, window=2, reach=4, chunk=4)


@pytest.fixture(scope="module")
def sparse_models(tmp_path_factory) -> ToyModels:
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.3)  # wide weights: peaked distributions that the window changes
    folder = tmp_path_factory.mktemp("tiny-sparse")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    target = ModelRunner(load_model(folder, dtype=torch.float32), num_slots=VOCAB + 1, max_seq_len=64)
    draft = StreamingRunner(load_model(folder, dtype=torch.float32), num_slots=VOCAB + 1, window=WINDOW)
    return ToyModels(_next_token_table(target, folder), _next_token_table(draft, folder))


def _next_token_table(runner: ModelRunner, folder: Path) -> torch.Tensor:
    """[VOCAB + 1, VOCAB]: row x the distribution after PROMPT + [x], row VOCAB (the harness's BOS) after PROMPT."""
    contexts = [[*PROMPT, x] for x in range(VOCAB)] + [PROMPT]
    logits = torch.cat(runner.extend([Extend(f"s{i}", 0, c) for i, c in enumerate(contexts)]))
    return processed_probs(logits, *_params(VOCAB + 1, 1.0))


def test_the_sparse_draft_differs_from_the_target(sparse_models: ToyModels) -> None:
    assert (sparse_models.draft - sparse_models.target).abs().max() > 0.05


def test_chain_verification_with_the_sparse_draft_is_lossless(sparse_models: ToyModels) -> None:
    tokens = _first_two_tokens(sparse_models, verify_chain, seed=100)
    assert _chi_square_pvalue(tokens, sparse_models.target_joint()) > 1e-4


@pytest.mark.parametrize("wrong_verifier", [_always_accept, _residual_is_target])
def test_the_same_harness_catches_a_broken_verifier(sparse_models: ToyModels, wrong_verifier) -> None:
    tokens = _first_two_tokens(sparse_models, wrong_verifier, seed=100)
    assert _chi_square_pvalue(tokens, sparse_models.target_joint()) < 1e-6
