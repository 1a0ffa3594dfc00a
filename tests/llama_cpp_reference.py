"""llama.cpp's own greedy decoding of a GGUF, one token per decode: the reference the llamacpp drafter and the
llamacpp target backend are checked against."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from specfleet.llamacpp import import_llama_cpp

SHORT_TEXTS = ["def fibonacci(n):\n    ", "The capital of France is", "Once upon a time, in a small village,",
               "import numpy as np\n\nx = np.arange(10)\nprint("]
"""Prompts the llamacpp drafter and target tests decode (code and prose, 5-15 tokens)."""


def llama_cpp_greedy(gguf: Path, prompt: list[int], count: int, *, threads: int = 1,
                     stop: bool = False) -> tuple[list[int], np.ndarray]:
    """``count`` tokens of plain greedy decoding in a separate one-sequence llama.cpp context (with ``stop``, fewer if
    one of llama.cpp's end-of-generation tokens comes first, which ends the list): the prompt and then each token
    fed one per decode (llama.cpp rounds a wide micro-batch differently: see `LlamaCppRunner`), each new token the
    argmax of the last logits. Returns the tokens and the logits after the prompt and after each token fed,
    [tokens, vocab]."""
    lib = import_llama_cpp()
    model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
    params = lib.llama_context_default_params()
    params.n_ctx = params.n_batch = max(512, len(prompt) + count)
    params.n_threads = params.n_threads_batch = threads
    ctx = lib.llama_init_from_model(model, params)
    vocab_handle = lib.llama_model_get_vocab(model)
    vocab = lib.llama_vocab_n_tokens(vocab_handle)
    try:
        tokens: list[int] = []
        rows: list[np.ndarray] = []
        for token in prompt[:-1]:
            array = (lib.llama_token * 1)(token)
            assert lib.llama_decode(ctx, lib.llama_batch_get_one(array, 1)) == 0
        feed = [prompt[-1]]
        for _ in range(count):
            array = (lib.llama_token * len(feed))(*feed)
            assert lib.llama_decode(ctx, lib.llama_batch_get_one(array, len(feed))) == 0
            rows.append(np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(vocab,)).copy())
            tokens.append(int(rows[-1].argmax()))
            if stop and lib.llama_vocab_is_eog(vocab_handle, tokens[-1]):
                break
            feed = [tokens[-1]]
        return tokens, np.stack(rows)
    finally:
        lib.llama_free(ctx)
        lib.llama_model_free(model)
