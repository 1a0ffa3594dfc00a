"""What a llama.cpp verify costs: one decode of n tokens of one sequence (a verify of n - 1 drafts) against one token,
by the GGUF's quantization. Whether speculation can pay on llama.cpp's kernels comes down to this curve: a chain
pays only where its accepted drafts per step exceed the ratio n-tokens / 1-token, minus 1.

`specfleet.llamacpp.LlamaCppRunner` alone (no services), after a fixed context, medians of repeats, in llama.cpp's
default micro-batches ("free") and in the llamacpp target's batch-invariant ones ("exact"). Besides the model's own
GGUF, ``--quantize`` makes other types from it with llama.cpp's ``llama_model_quantize`` (requantizing: the weights
are the shipped ones rounded again, close to but not the same model), into ``--out``.

    python -m bench.llamacpp_verify_cost                                   # SmolLM2-135M Q4_1
    python -m bench.llamacpp_verify_cost --quantize Q4_0 Q8_0              # and two other types made from it
    python -m bench.llamacpp_verify_cost --model qwen2.5-coder-1.5b --tokens 1 2 4 8
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

from specfleet.engine import Extend
from specfleet.llamacpp import LlamaCppRunner, import_llama_cpp
from specfleet.models import resolve_gguf

NEEDED_BY = "bench.llamacpp_verify_cost"


def quantized(source: Path, type_name: str, out: Path) -> Path:
    """``source`` requantized to ``type_name`` (e.g. Q8_0) in ``out``, made once."""
    lib = import_llama_cpp(NEEDED_BY)
    target = out / f"{source.stem}.{type_name}.gguf"
    if target.exists():
        return target
    ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{type_name}", None)
    if ftype is None:
        raise SystemExit(f"llama.cpp knows no quantization type {type_name!r}")
    out.mkdir(parents=True, exist_ok=True)
    params = lib.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = ftype, True
    print(f"quantizing {source.name} to {type_name} ...", flush=True)
    if lib.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {source} to {type_name}")
    return target


def decode_ms(gguf: Path, exact: bool, tokens: list[int], context: int, repeats: int, threads: int) -> list[float]:
    """Median ms of one decode of n tokens (each of ``tokens``) after ``context`` tokens, logits at every one."""
    runner = LlamaCppRunner(gguf, num_slots=1, max_seq_len=context + max(tokens) + 8, threads=threads,
                            batch_invariant=exact, needed_by=NEEDED_BY)
    try:
        runner.extend([Extend("s", 0, [(37 * i) % 1000 + 5 for i in range(context)])])
        medians = []
        for n in tokens:
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                runner.extend([Extend("s", context, [(7 * i) % 900 + 3 for i in range(n)], num_logits=n)])
                times.append(1000 * (time.perf_counter() - began))
            medians.append(statistics.median(times))
        return medians
    finally:
        runner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a preset or a .gguf file")
    parser.add_argument("--quantize", nargs="*", default=[], help="also these types made from it, e.g. Q4_0 Q8_0")
    parser.add_argument("--out", type=Path, default=Path("/tmp/specfleet-gguf"), help="where --quantize writes")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8, 9, 16])
    parser.add_argument("--context", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if 1 not in args.tokens:
        parser.error("--tokens must include 1: every row is compared with one token")
    source = resolve_gguf(args.model)
    ggufs = [source, *(quantized(source, name, args.out) for name in args.quantize)]
    header = " | ".join(f"n = {n}" for n in args.tokens)
    print(f"\nms per decode of n tokens after {args.context}, {args.threads} threads, median of {args.repeats}\n")
    print(f"| GGUF | mode | {header} | largest n / 1 |")
    print(f"| --- | --- | {' | '.join('---:' for _ in args.tokens)} | ---: |")
    for gguf in ggufs:
        for exact in (False, True):
            ms = decode_ms(gguf, exact, args.tokens, args.context, args.repeats, args.threads)
            one = ms[args.tokens.index(1)]
            print(f"| {gguf.name} | {'exact' if exact else 'free'} | {' | '.join(f'{m:.1f}' for m in ms)} | "
                  f"{ms[args.tokens.index(max(args.tokens))] / one:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
