"""SPACE: a target fine-tuned to draft for itself, against plain decoding and the ``ngram`` drafter.

The model: SmolLM2-135M fine-tuned by ``specfleet train-space`` (cached in ``--model-dir``; trained first, for
``--train-minutes``, when the folder holds no SPACE model). Prompts: ShareGPT opening turns the fine-tune never saw
(the first ones, `specfleet.training.sharegpt.HELD_OUT`), chat-rendered, greedy, ``--max-new-tokens`` each.

1. **Learning curve**: each weight snapshot of the fine-tune (``snapshots/step-N``) decodes ``--curve-prompts``
   prompts in process with SPACE at ``--curve-masks`` masks (`target_service.verifier.Verifier`): tokens per pass,
   beside the mask loss the training logged at that step.
2. **Perplexity** of the original and the fine-tuned model on held-out text: the first ShareGPT answers (written by
   the assistant of the dataset, not by either model), over the answer tokens.
3. **Speed**, through real services (a router and a target process each, a Redis): for each batch size of
   ``--batches`` that many requests at once, tokens per pass (tokens / Verify passes, from each stream's stats) and
   tokens/s (the batch's tokens over its wall time; median over ``--rounds``), for plain decoding of the original
   and of the fine-tuned model, SPACE at each of ``--masks`` and ``auto`` (``--self-draft``), lookahead on the
   original (``--lookahead-window``, ``--lookahead-ngram``, drafting n - 1), and the ``ngram`` drafter on the
   original (auto depth). SPACE's output must equal the fine-tuned model's plain output, and lookahead's and ngram's
   the original's, token for token: the run stops at the first difference. Then what one pass of the fine-tuned
   target cost, by batch and positions a sequence (a plain step: 1), from the latency it reported to Redis: what
   SPACE's candidates and masks add to a step.

    python -m bench.space                    # everything (trains first if needed), report to stdout
    python -m bench.space --batches 1 --rounds 1 --no-curve   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import Run, chat_ids, fleet, specfleet_generate
from bench.prompts import sharegpt_prompts

DEFAULT_DIR = Path.home() / ".cache" / "specfleet" / "space-smollm2-135m"
BASE_MODEL = "smollm2-135m"
LATENCY_SAMPLES = 20_000  # every sample the run leaves in Redis (the stream's cap)


@dataclass
class Cell:
    """One configuration at one batch size, over all rounds."""

    rates: list[float] = field(default_factory=list)  # tokens/s per round
    tokens: int = 0
    passes: int = 0
    drafted: int = 0
    accepted: int = 0

    def add(self, runs: list[Run], seconds: float) -> None:
        self.rates.append(sum(len(r.tokens) for r in runs) / seconds)
        self.tokens += sum(len(r.tokens) for r in runs)
        self.passes += sum(r.steps for r in runs)
        self.drafted += sum(r.drafted for r in runs)
        self.accepted += sum(r.accepted for r in runs)

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.passes if self.passes else 1.0


def ensure_model(folder: Path, minutes: float) -> Path:
    if not (folder / "specfleet_space.json").exists():
        print(f"no SPACE model in {folder}: training one for {minutes:g} min", flush=True)
        subprocess.run([sys.executable, "-m", "specfleet.cli", "train-space", "--model", BASE_MODEL, "--out",
                        str(folder), "--masks", "6", "--groups", "8", "--time-budget-min", str(minutes)], check=True)
    return folder


# -- 1. learning curve ------------------------------------------------------------------------------------------------

def space_decode(folder: Path, prompts: list[list[int]], max_new: int, masks: int) -> tuple[float, list[list[int]]]:
    """Greedy SPACE decoding of all prompts at once in process: (tokens per pass, outputs)."""
    from specfleet.engine import ModelRunner
    from specfleet.sampling_params import SamplingParams
    from specfleet.space_model import space_settings_for
    from target_service.self_drafting import SpaceDrafting
    from target_service.verifier import Verifier, VerifyItem

    runner = ModelRunner.from_folder(folder, num_slots=len(prompts),
                                     max_seq_len=max(map(len, prompts)) + max_new + 64)
    verifier = Verifier(runner, SpaceDrafting(*space_settings_for(folder, masks, -1, runner.vocab_size)))
    outputs = [list(p) for p in prompts]
    cached = [0] * len(prompts)
    candidates: list[tuple[int, ...]] = [()] * len(prompts)
    passes = [0] * len(prompts)
    live = list(range(len(prompts)))
    while live:
        items = [VerifyItem(f"s{n}", cached[n], outputs[n][cached[n]:], list(candidates[n]), None, SamplingParams(),
                            draft_next=masks) for n in live]
        for n, verdict in zip(live, verifier.verify(items), strict=True):
            outputs[n].extend(verdict.tokens)
            cached[n], candidates[n] = verdict.cached_len, verdict.next_tokens
            passes[n] += 1
        live = [n for n in live if len(outputs[n]) - len(prompts[n]) < max_new]
    made = [out[len(p):len(p) + max_new] for out, p in zip(outputs, prompts, strict=True)]
    return sum(len(m) for m in made) / sum(passes), made


def learning_curve(folder: Path, prompts: list[list[int]], max_new: int, masks: int) -> list[tuple[int, float, str]]:
    """(step, tokens per pass, mask loss logged near that step) for each snapshot, and for the final model where
    training went on past the last snapshot."""
    log = json.loads((folder / "training_log.json").read_text()) if (folder / "training_log.json").exists() else []
    losses = [(entry["step"], entry["mask_loss"]) for entry in log if "mask_loss" in entry and "loss" in entry]
    weights = {int(p.name.split("-")[1]): p for p in (folder / "snapshots").glob("step-*")}
    last_step = max((entry["step"] for entry in log if "step" in entry), default=0)
    if last_step > max(weights, default=-1):
        weights[last_step] = folder
    points = []
    for step, snapshot in sorted(weights.items()):
        per_pass, _ = space_decode(snapshot, prompts, max_new, masks)
        near = min(losses, key=lambda sl: abs(sl[0] - step), default=None)
        loss = f"{near[1]:.2f} (step {near[0]})" if near is not None and step else "-"
        print(f"  step {step:5d}: {per_pass:.2f} tokens per pass, mask loss {loss}", flush=True)
        points.append((step, per_pass, loss))
    return points


# -- 2. perplexity ----------------------------------------------------------------------------------------------------

def held_out_answers(count: int) -> list[tuple[str, str]]:
    """(prompt, answer) of the first ShareGPT conversations: text neither model wrote."""
    from specfleet.training.sharegpt import conversations

    pairs = []
    for conversation in conversations():
        turns = conversation.get("conversations") or []
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt" and \
                40 <= len(turns[0]["value"]) <= 400 and len(turns[1]["value"]) >= 200:
            pairs.append((turns[0]["value"], turns[1]["value"]))
            if len(pairs) == count:
                break
    return pairs


def perplexity(model_dir: Path, pairs: list[tuple[str, str]], max_answer_tokens: int) -> float:
    """exp(mean negative log-likelihood) of the answer tokens given the chat-rendered prompt."""
    from transformers import AutoModelForCausalLM

    from specfleet.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in pairs:
            prompt_ids = chat_ids(tokenizer, prompt)
            answer_ids = tokenizer.encode(answer, add_special_tokens=False)[:max_answer_tokens]
            ids = torch.tensor([prompt_ids + answer_ids])
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt_ids):], reduction="sum"))
            count += len(answer_ids)
    return math.exp(total / count)


# -- 3. speed through the services ------------------------------------------------------------------------------------

def serve_and_measure(folder: Path, prompts: list[list[int]], batches: list[int], masks: list[int], rounds: int,
                      max_new: int, lookahead_window: int, lookahead_ngram: int, log_dir: Path | None = None,
                      baselines: bool = True) -> tuple[dict[int, dict[str, Cell]], list[PassCost]]:
    from specfleet.models import resolve_model

    cells: dict[int, dict[str, Cell]] = {b: {} for b in batches}
    slots = ["--num-slots", str(max(batches)), "--max-seq-len", "1024"]
    with fleet(log_dir) as f:
        redis = f.redis()
        tuned = f.start("target", ["--model", str(folder), *slots, "--redis-url", redis], "target-space")
        routers: dict[str, tuple[str, str]] = {}
        if baselines:
            original = f.start("target", ["--model", str(resolve_model(BASE_MODEL)), *slots, "--redis-url", redis],
                               "target-original")
            lookahead = f.start("target", ["--model", str(resolve_model(BASE_MODEL)), *slots, "--redis-url", redis,
                                           "--lookahead-window", str(lookahead_window), "--lookahead-ngram",
                                           str(lookahead_ngram)], "target-lookahead")
            ngram = f.start("draft", ["--drafter", "ngram", "--redis-url", redis], "ngram")
            routers = {
                "plain, original": (f.router(original, None, 0, "r-plain-original", ["--redis-url", redis]), ""),
                "ngram (auto), original": (f.router(original, ngram, "auto", "r-ngram", ["--redis-url", redis]),
                                           "plain, original"),
                f"lookahead K={lookahead_ngram - 1}, original": (
                    f.router(lookahead, None, lookahead_ngram - 1, "r-lookahead",
                             ["--self-draft", "--redis-url", redis]), "plain, original"),
            }
        routers["plain, fine-tuned"] = (f.router(tuned, None, 0, "r-plain-tuned", ["--redis-url", redis]), "")
        for depth in [*masks, "auto"]:
            routers[f"SPACE K={depth}"] = (f.router(tuned, None, depth, f"r-space-{depth}",
                                                    ["--self-draft", "--redis-url", redis]), "plain, fine-tuned")
        for round_index in range(rounds):
            for batch in batches:
                group = [prompts[(round_index * batch + i) % len(prompts)] for i in range(max(batch, 4 // batch))]
                outputs: dict[str, list[list[int]]] = {}
                for name, (address, reference) in routers.items():
                    runs, seconds = _batch(address, group, batch, max_new)
                    cells[batch].setdefault(name, Cell()).add(runs, seconds)
                    outputs[name] = [r.tokens for r in runs]
                    if reference and outputs[name] != outputs[reference]:
                        raise AssertionError(f"{name} differs from {reference} at batch {batch}")
                    print(f"  round {round_index + 1} batch {batch:2d} {name:<24} "
                          f"{cells[batch][name].rates[-1]:7.1f} tok/s", flush=True)
        time.sleep(1.0)  # let the services' telemetry writers flush
        passes = pass_costs(redis, tuned.rsplit(":", 1)[1], batches)
    return cells, passes


@dataclass(frozen=True)
class PassCost:
    """The fine-tuned target's Verify passes of one shape, as it reported them to Redis."""

    batch: int
    tokens_per_seq: float  # positions a sequence fed: 1 plain; 1 + k + (k + 1) K with k candidates and K masks
    passes: int
    median_ms: float


def pass_costs(redis_url: str, target_port: str, batches: list[int]) -> list[PassCost]:
    """What one pass of the fine-tuned target cost by batch and positions a sequence, over the whole run: how much
    a SPACE pass's candidates and masks add to a plain step. Only the measured ``batches`` whole and passes where
    every sequence fed as many positions (the partial batches of requests arriving or finishing are left out)."""
    from specfleet.telemetry import TelemetryReader

    reader = TelemetryReader(redis_url, latency_window=LATENCY_SAMPLES)
    reader.read()
    by_shape: dict[tuple[int, float], list[float]] = {}
    for replica, sample in reader.samples_by_replica():
        uniform = sample.tokens_per_seq.is_integer() and sample.widest in (None, sample.tokens_per_seq)
        if sample.role == "target" and replica.endswith(f":{target_port}") and sample.batch_size in batches \
                and uniform:
            by_shape.setdefault((sample.batch_size, sample.tokens_per_seq), []).append(sample.ms)
    return [PassCost(batch, tokens, len(ms), statistics.median(ms)) for (batch, tokens), ms in sorted(by_shape.items())]


def _batch(address: str, prompts: list[list[int]], batch: int, max_new: int) -> tuple[list[Run], float]:
    """``prompts`` sent ``batch`` at a time (all at once when there are as many): the runs and the wall seconds."""
    generate: Callable[[list[int]], Run] = lambda ids: specfleet_generate(address, ids, max_new)  # noqa: E731
    started = time.perf_counter()
    with ThreadPoolExecutor(batch) as pool:
        runs = list(pool.map(generate, prompts))
    return runs, time.perf_counter() - started


def report(curve: list[tuple[int, float, str]], curve_masks: int, ppl: tuple[float, float] | None,
           cells: dict[int, dict[str, Cell]], passes: Sequence[PassCost] = ()) -> str:
    lines: list[str] = []
    if cells:
        lines += ["| batch | configuration | tokens per pass | tokens/s | vs plain fine-tuned | acceptance |",
                  "| ---: | --- | ---: | ---: | ---: | ---: |"]
        for batch, by_name in cells.items():
            base = statistics.median(by_name["plain, fine-tuned"].rates)
            for name, cell in by_name.items():
                rate = statistics.median(cell.rates)
                acceptance = f"{cell.accepted / cell.drafted:.0%}" if cell.drafted else "-"
                lines.append(f"| {batch} | {name} | {cell.tokens_per_pass:.2f} | {rate:.1f} | {rate / base:.2f}x | "
                             f"{acceptance} |")
        lines.append("")
    if passes:
        plain = {p.batch: p.median_ms for p in passes if p.tokens_per_seq == 1.0}
        lines += ["The fine-tuned target's passes (all configurations; as its Verify calls reported them):", "",
                  "| batch | positions a sequence | passes | median ms | vs a plain pass |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for p in passes:
            ratio = f"{p.median_ms / plain[p.batch]:.2f}x" if p.batch in plain else "-"
            lines.append(f"| {p.batch} | {p.tokens_per_seq:g} | {p.passes} | {p.median_ms:.1f} | {ratio} |")
        lines.append("")
    if ppl is not None:
        lines += [f"Perplexity on held-out ShareGPT answers: original {ppl[0]:.2f}, fine-tuned {ppl[1]:.2f} "
                  f"({ppl[1] / ppl[0] - 1:+.1%}).", ""]
    if curve:
        lines += [f"Learning curve (SPACE at K={curve_masks}, in process):", "",
                  "| training step | tokens per pass | mask loss |", "| ---: | ---: | --- |"]
        lines += [f"| {step} | {per_pass:.2f} | {loss} |" for step, per_pass, loss in curve]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--train-minutes", type=float, default=60.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--masks", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--curve-prompts", type=int, default=8)
    parser.add_argument("--curve-masks", type=int, default=4)
    parser.add_argument("--ppl-texts", type=int, default=40)
    parser.add_argument("--lookahead-window", type=int, default=6)
    parser.add_argument("--lookahead-ngram", type=int, default=4)
    parser.add_argument("--no-curve", action="store_true")
    parser.add_argument("--no-ppl", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--no-baselines", action="store_true",
                        help="speed: only the fine-tuned model (plain, and SPACE at each K and auto)")
    parser.add_argument("--log-dir", type=Path, help="keep the services' logs here, at INFO (the routers' depth "
                        "decisions and their reasons); default: at WARNING, in a folder removed at the end")
    args = parser.parse_args(argv)

    from specfleet.models import load_tokenizer, resolve_model

    folder = ensure_model(args.model_dir, args.train_minutes)
    tokenizer = load_tokenizer(resolve_model(BASE_MODEL))
    prompts = [chat_ids(tokenizer, text) for text in sharegpt_prompts(args.prompts)]
    curve = [] if args.no_curve else learning_curve(folder, prompts[: args.curve_prompts], args.max_new_tokens,
                                                     args.curve_masks)
    ppl = None
    if not args.no_ppl:
        pairs = held_out_answers(args.ppl_texts)
        ppl = (perplexity(resolve_model(BASE_MODEL), pairs, 256), perplexity(folder, pairs, 256))
    cells, passes = ({}, []) if args.no_speed else serve_and_measure(
        folder, prompts, args.batches, args.masks, args.rounds, args.max_new_tokens, args.lookahead_window,
        args.lookahead_ngram, args.log_dir, not args.no_baselines)
    print()
    print(report(curve, args.curve_masks, ppl, cells, passes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
