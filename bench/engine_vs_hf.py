"""One forward pass of specfleet's engine against transformers' own forward with its KV cache: same weights, dtype,
device and threads, over a grid of batch size x new tokens per sequence x context length. This is the table that says
where the engine loses.

    python -m bench.engine_vs_hf --model smollm2-135m
    python -m bench.engine_vs_hf --model qwen2.5-coder-1.5b --batches 1 4 16
    python -m bench.engine_vs_hf --architecture qwen2.5-coder-1.5b --device cuda   # random weights, no download

A cell times one forward of ``batch`` sequences that each hold ``context`` tokens and append ``tokens`` new ones,
logits at every new token (what a verify needs): the engine's `ModelRunner.extend` against transformers'
``model(input_ids, past_key_values=DynamicCache)``, both rolled back to ``context`` after each call. The caches are
filled with random keys and values rather than prefilled (a forward's time does not depend on their values; a real
prefill of 32 x 4K tokens would take most of an hour on a small CPU). Repeats interleave the two, and the table gives
each one's median and the ratio engine / transformers (< 1: the engine is faster).

``--architecture`` builds the model from a preset's architecture numbers with random weights (saved once, loaded by
both sides), for machines that cannot fetch the preset: a forward's time does not depend on the weights' values.
Cells whose two KV caches would not fit in ``--max-kv-gib`` are skipped and listed.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from specfleet.engine import Extend, ModelRunner
from specfleet.engine.llama import LlamaForCausalLM
from specfleet.engine.runner import engine_dtype, load_model, set_cpu_threads
from specfleet.models import resolve_model

ARCHITECTURES = {
    # The presets' config.json numbers, for --architecture on machines that cannot fetch the presets.
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "qwen2.5-coder-1.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936,
                               hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                               num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                               max_position_embeddings=32768, tie_word_embeddings=True),
}


@dataclass
class Cell:
    batch: int
    tokens: int
    context: int
    engine_ms: list[float]
    hf_ms: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.engine_ms) / statistics.median(self.hf_ms)


def random_model_folder(name: str, dtype: torch.dtype, out: Path) -> Path:
    """A folder with the architecture ``name`` and random weights, in transformers' format."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(ARCHITECTURES[name])
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    return out


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_gib(config, batch: int, length: int, dtype: torch.dtype) -> float:
    """One side's KV cache for a cell, in GiB (``config``: transformers' config of the model)."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim_of(config)
    return batch * length * per_token * torch.finfo(dtype).bits / 8 / 2**30


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(forward: Callable[[], None], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    forward()
    synchronize(device)
    return (time.perf_counter() - start) * 1000


def fill_random_cache(runner: ModelRunner, batch: int, length: int) -> list[str]:
    """``batch`` sequences in ``runner`` (their names), each holding ``length`` cache entries of random keys and
    values: a forward's time does not depend on their values, and a real prefill of many long prompts takes minutes
    on a small CPU."""
    names = [f"s{i}" for i in range(batch)]
    runner.extend([Extend(name, 0, [1]) for name in names])  # every slot now holds a sequence
    for keys, values in zip(runner.cache.keys, runner.cache.values, strict=True):
        keys.normal_()
        values.normal_()
    runner.cache.lengths[:] = [length] * batch
    return names


def engine_side(model: LlamaForCausalLM, batch: int, tokens: int, context: int, max_seq_len: int = 0
                ) -> tuple[ModelRunner, Callable[[], None]]:
    """The engine with ``batch`` sequences of ``context`` random cached tokens, and one verify-shaped forward;
    each slot holds ``max_seq_len`` entries (at least context + tokens), as a service's slots hold its longest."""
    runner = ModelRunner(model, num_slots=batch, max_seq_len=max(max_seq_len, context + tokens))
    names = fill_random_cache(runner, batch, context)
    new = [[(7 * i + j) % 1000 + 1 for j in range(tokens)] for i in range(batch)]

    def forward() -> None:
        runner.extend([Extend(name, context, ids, num_logits=tokens) for name, ids in zip(names, new, strict=True)])

    return runner, forward


def hf_side(model, device: str, dtype: torch.dtype, batch: int, tokens: int, context: int) -> Callable[[], None]:
    """transformers' model with a DynamicCache of ``context`` random tokens per sequence, and one forward."""
    from transformers import DynamicCache

    config = model.config
    cache = DynamicCache(config=config)
    shape = (batch, config.num_key_value_heads, context, head_dim_of(config))
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device),
                     layer)
    ids = torch.tensor([[(7 * i + j) % 1000 + 1 for j in range(tokens)] for i in range(batch)], device=device)
    positions = torch.arange(context, context + tokens, device=device)

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=ids, past_key_values=cache, cache_position=positions,
                  position_ids=positions.expand(batch, -1), use_cache=True)
        cache.crop(-tokens)  # back to the context: drop the tokens just appended

    return forward


def run_grid(args: argparse.Namespace) -> tuple[list[Cell], list[str]]:
    from transformers import AutoModelForCausalLM

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = engine_dtype(args.dtype, device)
    set_cpu_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = (random_model_folder(args.architecture, dtype, Path(tmp)) if args.architecture
                  else resolve_model(args.model))
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        engine = load_model(folder, device=device, dtype=dtype)  # with packed CPU weights, as the services run it
        cells, skipped = [], []
        for context in args.contexts:
            for batch in args.batches:
                for tokens in args.tokens:
                    need = 2 * kv_gib(hf.config, batch, context + tokens, dtype)
                    if need > args.max_kv_gib:
                        skipped.append(f"batch {batch} x {tokens} tokens at {context}: {need:.1f} GiB of KV")
                        continue
                    runner, ours = engine_side(engine, batch, tokens, context)
                    theirs = hf_side(hf, device, dtype, batch, tokens, context)
                    for _ in range(args.warmup):
                        ours()
                        theirs()
                    cell = Cell(batch, tokens, context, [], [])
                    for _ in range(args.repeats):
                        cell.engine_ms.append(timed(ours, device))
                        cell.hf_ms.append(timed(theirs, device))
                    cells.append(cell)
                    print(f"  context {context:5d} batch {batch:3d} tokens {tokens}: engine "
                          f"{statistics.median(cell.engine_ms):8.1f} ms, transformers "
                          f"{statistics.median(cell.hf_ms):8.1f} ms, ratio {cell.ratio:.2f}", flush=True)
                    del runner, ours, theirs
                    gc.collect()
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
    return cells, skipped


def table(cells: list[Cell]) -> str:
    lines = ["| context | batch | new tokens | engine ms | transformers ms | engine / transformers |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in cells:
        mark = "" if c.ratio <= 1.0 else " **slower**"
        lines.append(f"| {c.context} | {c.batch} | {c.tokens} | {statistics.median(c.engine_ms):.1f} | "
                     f"{statistics.median(c.hf_ms):.1f} | {c.ratio:.2f}{mark} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a preset or a local Hugging Face folder")
    parser.add_argument("--architecture", choices=list(ARCHITECTURES), default="",
                        help="random weights in this preset's architecture instead of --model's weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 16, 32])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 9])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-kv-gib", type=float, default=8.0, help="skip cells whose two KV caches need more")
    args = parser.parse_args()
    cells, skipped = run_grid(args)
    what = f"{args.architecture} (random weights)" if args.architecture else args.model
    print(f"\n{what}, median of {args.repeats} interleaved repeats per cell\n")
    print(table(cells))
    slower = [c for c in cells if c.ratio > 1.0]
    print(f"\nengine slower in {len(slower)} of {len(cells)} cells"
          + (f"; worst {max(c.ratio for c in slower):.2f}" if slower else ""))
    for line in skipped:
        print(f"skipped: {line}")


if __name__ == "__main__":
    main()
