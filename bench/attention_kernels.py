"""One query per sequence over long KV caches: `grouped_attention`'s two matmuls against PyTorch's CPU flash kernel
(``scaled_dot_product_attention``), and plain decoding by the engine against ``transformers``' forward at batch 1.

    python -m bench.attention_kernels --contexts 512 1024 2048 4096 7000 --rows 1 8 16

SmolLM2-135M's attention shape (9 query heads over 3 key-value heads of 64 dimensions), keys and values read as the
engine reads them (a view of the first kv_len entries of a longer cache). Prints median microseconds per call and
the ratio; then median ms per decoded token for the engine and for transformers at each context (batch 1, greedy,
the model's preset), the engine's attention choice included.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from specfleet.engine.cpu_attention import grouped_attention

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def _median_us(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1e6 * statistics.median(times)


def kernel_table(contexts: list[int], rows_list: list[int], repeats: int) -> list[str]:
    lines = ["| rows | KV entries | matmuls (us) | flash kernel (us) | matmuls / flash |", "|---:|---:|---:|---:|---:|"]
    for rows in rows_list:
        for n in contexts:
            keys = torch.randn(rows, KV_HEADS, max(contexts) * 2, HEAD_DIM)[:, :, :n]
            values = torch.randn(rows, KV_HEADS, max(contexts) * 2, HEAD_DIM)[:, :, :n]
            q = torch.randn(rows, HEADS, 1, HEAD_DIM)
            bias = torch.zeros(rows, 1, 1, 1, n)
            mask = torch.ones(rows, 1, 1, n, dtype=torch.bool)
            ours = _median_us(functools.partial(grouped_attention, q, keys, values, bias), repeats)
            flash = _median_us(functools.partial(F.scaled_dot_product_attention, q, keys, values, attn_mask=mask,
                                                 enable_gqa=True), repeats)
            lines.append(f"| {rows} | {n} | {ours:.0f} | {flash:.0f} | {ours / flash:.2f} |")
    return lines


def decode_table(contexts: list[int], model: str, tokens: int) -> list[str]:
    import argparse as argparse_module
    import difflib

    from transformers import AutoModelForCausalLM

    from specfleet.engine import Extend, ModelRunner
    from specfleet.models import load_tokenizer, resolve_model

    folder = resolve_model(model)
    text = inspect.getsource(argparse_module) + inspect.getsource(difflib)
    ids = load_tokenizer(folder).encode(text)
    if len(ids) < max(contexts):
        raise SystemExit(f"the source text has {len(ids)} tokens, fewer than --contexts asks for")
    engine = ModelRunner.from_folder(folder, num_slots=1, max_seq_len=max(contexts) + tokens + 1)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lines = ["| context | engine (ms/token) | transformers (ms/token) | engine / transformers |",
             "|---:|---:|---:|---:|"]
    for n in contexts:
        prompt = ids[:n]
        engine.release(["s"])
        token, length, ours = int(engine.extend([Extend("s", 0, prompt)])[0][-1].argmax()), n, []
        for _ in range(tokens):
            started = time.perf_counter()
            token = int(engine.extend([Extend("s", length, [token])])[0][-1].argmax())
            ours.append(time.perf_counter() - started)
            length += 1
        theirs = []
        with torch.inference_mode():
            out = reference(torch.tensor([prompt]), use_cache=True)
            cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
            for _ in range(tokens):
                started = time.perf_counter()
                out = reference(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                theirs.append(time.perf_counter() - started)
                cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        a, b = 1000 * statistics.median(ours[4:]), 1000 * statistics.median(theirs[4:])
        lines.append(f"| {n} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 7000])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16], help="sequences per attention call")
    parser.add_argument("--repeats", type=int, default=100, help="calls timed per kernel and shape")
    parser.add_argument("--model", default="smollm2-135m", help="the model decoded in the second table")
    parser.add_argument("--tokens", type=int, default=24, help="tokens decoded per context (the first 4 not counted)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("\n".join(kernel_table(args.contexts, args.rows, args.repeats)))
    print()
    print("\n".join(decode_table(args.contexts, args.model, args.tokens)))


if __name__ == "__main__":
    main()
