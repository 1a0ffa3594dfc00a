"""Speculative decoding over long contexts: the ``sparse_self`` drafter (MagicDec) against plain decoding and ``ngram``.

SmolLM2-135M target (``smollm2-135m``, 8K context), greedy, ``--max-new-tokens`` (64) new tokens per request, prompts
of exactly 1K, 4K and 7K tokens (``--contexts``), B requests sent at once (``--batches`` 1, 8, 16). The prompts ship
offline: long Python standard-library modules (argparse.py, difflib.py, typing.py, ...) and long ShareGPT
conversations, taken in turn, each cut to the context and put in a chat turn that asks for a summary ("<document>
Summarise what this code does."; ``--task continue``: the bare document, to be continued). A batch's requests are
different documents, or different line-aligned windows of one, so none is a copy of another.

Configurations, each a router over one target service (``--max-seq-len 8192``):

- ``plain``: depth 0, the baseline of every speedup;
- ``ngram dK``: the ``ngram`` drafter at each of ``--ngram-depths`` (the table keeps the best per cell);
- ``sparse_self dK``: the target's own weights drafting over a StreamingLLM cache of 16 sink and 240 recent tokens
  (``specfleet draft --drafter sparse_self``), at each of ``--sparse-depths``;
- ``auto (sparse_self)``: ``--depth auto`` with the sparse_self pool;
- with ``--both-pools``, ``auto (ngram + sparse_self)``: ``--depth auto`` with both pools, named
  (``--drafts ngram=HOST:PORT,sparse_self=HOST:PORT``), the policy choosing per step;
- ``HF generate``: transformers' plain decoding of the same converted model at batch 1, a reference for the speed
  of specfleet's own engine.

Measured per request, as MagicDec measures it: the **decode goodput**, tokens after the first over the time from the
first token to the last, and the time to the first token (TTFT, mostly the prompt's prefill) apart, since at these
lengths prefill would swamp what drafting changes. Each request generates exactly ``--max-new-tokens`` tokens (EOS
ignored), so a batch stays whole for its whole decode. A cell's goodput is the median over its rounds of the batch's
per-request goodputs summed; acceptance is accepted / drafted tokens over the cell's requests, from the stream's
speculation stats. Every greedy speculative output must equal plain decoding's token for token, prompt by prompt:
the run stops with the first difference.

Prefill dominates the wall time on a CPU, so the target reuses prompts it has prefilled (``--prefix-reuse on``, the
default here: each round first sends the batch's prompts through the plain router for one token, printing their cold
TTFT, and every configuration then starts from the target's cached prompts, plain included: a plain row measured
cold would decode alongside the batch's other prefills and understate plain decoding), the sparse_self draft still
prefills every prompt itself (``--prefix-reuse off``: its streaming cache continues a sequence only from about where
it ended, and each prompt here comes again after its decode has moved past it), and the default sends one batch per
cell (two requests at batch 1); ``--prompts`` raises it.
Cells run in order of context, then batch, and each finished cell is printed (and written to ``--report-table``) at
once.

    python -m bench.long_context                          # the full grid, the table and bench/long_context.png
    python -m bench.long_context --quick                  # a smoke test: 512-token prompts, batch 1 and 2
    python -m bench.long_context --contexts 4096 --batches 8 --sparse-depths 2 3 --no-hf   # one cell
"""

from __future__ import annotations

import argparse
import gc
import math
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Protocol

from bench.common import fleet

MODEL = "smollm2-135m"
MODEL_CONTEXT = 8192  # SmolLM2-135M's max_position_embeddings: prompt plus new tokens must fit
SPARSE_SINKS, SPARSE_WINDOW = 16, 240

# Long standard-library modules (40-230 KB each), present in CPython 3.11-3.13; those missing are skipped.
STDLIB_FILES = (
    "argparse.py", "difflib.py", "typing.py", "inspect.py", "subprocess.py", "tarfile.py", "pydoc.py", "doctest.py",
    "email/_header_value_parser.py", "unittest/mock.py", "logging/__init__.py", "urllib/request.py", "enum.py",
    "mailbox.py", "locale.py", "ipaddress.py", "pickle.py", "ast.py", "optparse.py", "dataclasses.py", "threading.py",
    "http/client.py", "shutil.py", "configparser.py", "ssl.py", "collections/__init__.py",
)
INSTRUCTIONS = {"code": "Summarise what this code does.", "chat": "Summarise this conversation."}
WINDOWS_PER_DOCUMENT = 3  # windows start at the first line and at lines about 1/3 and 2/3 into a document
CHARS_PER_TOKEN_BOUND = 12  # more characters than any token of code or English text holds: enough text to tokenise


class ChatTokenizer(Protocol):
    """What the prompt building needs of a Hugging Face tokenizer (the tests pass a fake)."""

    def apply_chat_template(self, conversation: list[dict[str, str]], *, add_generation_prompt: bool,
                            tokenize: bool) -> str: ...

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]: ...


# ---------------------------------------------------------------------------------------------------------------
# prompts: documents cut to exactly N tokens


@dataclass(frozen=True)
class Frame:
    """The tokens around a document in a prompt: a chat turn's opening before it, the instruction and the opening of
    the assistant's turn after it. Joined as token ids, not re-tokenised text, so a prompt's length is exact."""

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    def document_tokens(self, context: int) -> int:
        """How many document tokens a prompt of ``context`` tokens holds."""
        room = context - len(self.prefix) - len(self.suffix)
        if room < 1:
            raise ValueError(f"a {context}-token prompt has no room for a document: the frame alone takes "
                             f"{len(self.prefix) + len(self.suffix)} tokens")
        return room

    def wrap(self, document: Sequence[int], context: int) -> list[int]:
        """Exactly ``context`` tokens: the frame around the document's first tokens."""
        need = self.document_tokens(context)
        if len(document) < need:
            raise ValueError(f"a {len(document)}-token document is too short for a {context}-token prompt "
                             f"({need} document tokens)")
        return [*self.prefix, *document[:need], *self.suffix]


MARKER = "<<<DOCUMENT>>>"


def chat_frame(tokenizer: ChatTokenizer, instruction: str) -> Frame:
    """The frame of a user turn ``"<document>\\n\\n<instruction>"`` under the model's chat template, ending with the
    assistant's turn opened."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{MARKER}\n\n{instruction}"}],
                                         add_generation_prompt=True, tokenize=False)
    before, marker, after = text.partition(MARKER)
    if not marker or MARKER in after:
        raise ValueError("the chat template must hold the user's message exactly once")
    return Frame(tuple(tokenizer.encode(before, add_special_tokens=False)),
                 tuple(tokenizer.encode(after, add_special_tokens=False)))


def line_start(text: str, fraction: float) -> int:
    """The start of the first line at or after ``fraction`` of ``text`` (0 for fraction 0): windows begin at whole
    lines, as a reader would paste them."""
    at = int(len(text) * fraction)
    if at == 0:
        return 0
    newline = text.find("\n", at - 1)
    return len(text) if newline < 0 else newline + 1


def document_windows(documents: Sequence[tuple[str, str]], encode: Callable[[str], list[int]], need: int,
                     per_document: int = WINDOWS_PER_DOCUMENT) -> Iterator[tuple[str, list[int]]]:
    """(label, exactly ``need`` tokens) windows of the documents (name, text): every document's first window, then
    every document's second, ...; a window that would run past its document's end is left out."""
    for k in range(per_document):
        for name, text in documents:
            start = line_start(text, k / per_document)
            if k and start == line_start(text, (k - 1) / per_document):
                continue  # a document too short to have distinct windows
            ids = encode(text[start: start + need * CHARS_PER_TOKEN_BOUND])
            if len(ids) >= need:
                yield f"{name}@{start}", ids[:need]


def interleave(*streams: Iterable[Any]) -> Iterator[Any]:
    """The streams' items in turn (a, b, a, b, ...), the longer one's alone once the other runs out."""
    marker = object()
    for items in zip_longest(*streams, fillvalue=marker):
        yield from (item for item in items if item is not marker)


@dataclass(frozen=True)
class Prompt:
    label: str  # the document and where its window starts, for messages
    kind: str  # "code" or "chat"
    ids: list[int]


def build_prompts(sources: dict[str, tuple[Frame, Sequence[tuple[str, str]]]], encode: Callable[[str], list[int]],
                  context: int, count: int) -> list[Prompt]:
    """``count`` distinct prompts of exactly ``context`` tokens, the sources' kinds taken in turn."""
    def stream(kind: str, frame: Frame, docs: Sequence[tuple[str, str]]) -> Iterator[Prompt]:
        for label, ids in document_windows(docs, encode, frame.document_tokens(context)):
            yield Prompt(label, kind, frame.wrap(ids, context))

    seen: set[tuple[int, ...]] = set()

    def unseen(prompt: Prompt) -> bool:  # a window of repeated text can equal another one: sent twice, it is cached
        new = tuple(prompt.ids) not in seen
        seen.add(tuple(prompt.ids))
        return new

    prompts = _take(filter(unseen, interleave(*(stream(kind, frame, docs) for kind, (frame, docs) in sources.items()))),
                    count)
    if len(prompts) < count:
        raise SystemExit(f"only {len(prompts)} distinct {context}-token prompts in the documents, {count} needed: "
                         f"use fewer --prompts or smaller --batches")
    return prompts


def _take(items: Iterator[Any], count: int) -> list[Any]:
    return [item for _, item in zip(range(count), items, strict=False)]


def stdlib_documents() -> list[tuple[str, str]]:
    """The long standard-library modules of the running Python, (name, source)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(name, (root / name).read_text(encoding="utf-8")) for name in STDLIB_FILES if (root / name).is_file()]


def summarise_code_prompts(tokenizer: ChatTokenizer, context: int, count: int) -> list[list[int]]:
    """``count`` prompts of exactly ``context`` tokens: long standard-library modules in a user turn asking for a
    summary (for the benchmarks that need long prompts of one kind, without ShareGPT's download)."""
    sources = {"code": (chat_frame(tokenizer, INSTRUCTIONS["code"]), stdlib_documents())}
    return [p.ids for p in build_prompts(sources, lambda text: tokenizer.encode(text, add_special_tokens=False),
                                         context, count)]


# ---------------------------------------------------------------------------------------------------------------
# measuring


@dataclass
class Timed:
    """One streamed request: its tokens, when they came (seconds from sending it) and its speculation stats."""

    tokens: list[int]
    first_s: float  # the first message that carried tokens
    first_tokens: int  # how many tokens that message carried (more than one: drafts accepted on the first step)
    last_s: float  # the last token
    steps: int = 0
    drafted: int = 0
    accepted: int = 0


def decode_goodput(t: Timed) -> float | None:
    """Tokens after the first message over the time from it to the last token (MagicDec's decode throughput: the
    prefill, and whatever the first step drafted, left out). None when nothing came after the first message."""
    decoded, span = len(t.tokens) - t.first_tokens, t.last_s - t.first_s
    return decoded / span if decoded > 0 and span > 0 else None


@dataclass
class Cell:
    """One configuration at one (context, batch): its requests, round by round (a round: the batch sent at once)."""

    rounds: list[list[Timed]] = field(default_factory=list)

    def _all(self) -> list[Timed]:
        return [t for r in self.rounds for t in r]

    def goodput(self) -> float:
        """Median over rounds of the batch's decode goodputs summed (a request without a decode phase adds 0)."""
        return statistics.median(sum(decode_goodput(t) or 0.0 for t in r) for r in self.rounds)

    def ttft_ms(self) -> float:
        return 1000 * statistics.median(t.first_s for t in self._all())

    def acceptance(self) -> float | None:
        drafted = sum(t.drafted for t in self._all())
        return sum(t.accepted for t in self._all()) / drafted if drafted else None

    def tokens_per_step(self) -> float | None:
        steps = sum(t.steps for t in self._all())
        return sum(len(t.tokens) for t in self._all()) / steps if steps else None


def stream_timed(address: str, ids: list[int], max_new_tokens: int) -> Timed:
    """One greedy request through a router's GenerateStream, each message timed as it arrives."""
    from specfleet.client import make_request, stream

    request = make_request(ids, max_new_tokens=max_new_tokens, ignore_eos=True)
    sent = time.perf_counter()
    tokens: list[int] = []
    first_s, first_tokens, last_s = 0.0, 0, 0.0
    stats = None
    for message in stream(address, request, timeout_s=3600):
        if message.token_ids:
            last_s = time.perf_counter() - sent
            if not tokens:
                first_s, first_tokens = last_s, len(message.token_ids)
            tokens.extend(message.token_ids)
        stats = message.stats
    timed = Timed(tokens, first_s, first_tokens, last_s)
    if stats is not None:
        timed.steps, timed.drafted, timed.accepted = stats.steps, stats.drafted_tokens, stats.accepted_tokens
    return timed


def send_batch(address: str, prompts: list[list[int]], max_new_tokens: int) -> list[Timed]:
    """The prompts sent at once, one client thread each (the router batches them); answers in prompt order."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda ids: stream_timed(address, ids, max_new_tokens), prompts))


class NotLosslessError(AssertionError):
    """A greedy speculative answer differs from plain decoding's: the bench's numbers would be of a wrong answer."""


def check_identical(name: str, got: list[Timed], expected: list[Timed], prompts: list[Prompt],
                    decode: Callable[[list[int]], str]) -> None:
    for t, e, p in zip(got, expected, prompts, strict=True):
        if t.tokens != e.tokens:
            at = next((i for i, (a, b) in enumerate(zip(t.tokens, e.tokens, strict=False)) if a != b),
                      min(len(t.tokens), len(e.tokens)))
            raise NotLosslessError(
                f"{name} is not token-identical to plain decoding on prompt {p.label} ({len(p.ids)} tokens): first "
                f"difference at new token {at} of {len(e.tokens)}\n  plain: {decode(e.tokens)!r}\n  "
                f"{name}: {decode(t.tokens)!r}")


def cell_work(context: int, requests: int) -> float:
    """A cell's cost in prompt tokens, scaled for attention: on a CPU prefill dominates, and a prompt's attention
    grows with its length (SmolLM2-135M: a 6K-token prompt's attention takes about as many FLOPs as its weights),
    for a rough time left."""
    return requests * context * (1 + context / 6000)


def rounds_for(prompts_per_cell: int, batch: int) -> int:
    """Rounds of ``batch`` requests that send at least ``prompts_per_cell`` requests (at least one round)."""
    return max(1, math.ceil(prompts_per_cell / batch))


# ---------------------------------------------------------------------------------------------------------------
# configurations


PLAIN = "plain"


def ngram_name(depth: int) -> str:
    return f"ngram d{depth}"


def sparse_name(depth: int) -> str:
    return f"sparse_self d{depth}"


AUTO_SPARSE = "auto (sparse_self)"
AUTO_BOTH = "auto (ngram + sparse_self)"
HF = "HF generate"


def both_pools_drafts(ngram: str, sparse: str) -> str:
    """``--drafts`` naming each pool by its drafter, for a router that chooses between pools per step."""
    return f"ngram={ngram},sparse_self={sparse}"


@dataclass(frozen=True)
class RouterPlan:
    """One configuration's router."""

    drafts: str | None  # its --drafts (None: no draft pool)
    depth: str  # its --depth
    kinds: frozenset[str]  # the drafter kinds it must report once running (GetServerInfo's draft_kinds)


def router_plans(ngram_depths: Sequence[int], sparse_depths: Sequence[int], both_pools: bool, ngram: str,
                 sparse: str) -> dict[str, RouterPlan]:
    """Each configuration's router, in the order they run (plain first: every other answer is checked against it)."""
    ngram_kind, sparse_kind = frozenset({"ngram"}), frozenset({"sparse_self"})
    plans = {PLAIN: RouterPlan(None, "0", frozenset())}
    plans |= {ngram_name(d): RouterPlan(ngram, str(d), ngram_kind) for d in ngram_depths}
    plans |= {sparse_name(d): RouterPlan(sparse, str(d), sparse_kind) for d in sparse_depths}
    plans[AUTO_SPARSE] = RouterPlan(sparse, "auto", sparse_kind)
    if both_pools:
        plans[AUTO_BOTH] = RouterPlan(both_pools_drafts(ngram, sparse), "auto", ngram_kind | sparse_kind)
    return plans


def draft_kinds(address: str) -> frozenset[str]:
    """The drafter kinds a router's draft pool reports (those of the drafts it has reached)."""
    from specfleet.client import server_info

    return frozenset(server_info(address).draft_kinds)


def check_pools(routers: dict[str, str], plans: dict[str, RouterPlan], wait_s: float = 30.0) -> None:
    """Every router drafts with the drafters its configuration names: a pool the router cannot reach (or a --drafts
    it reads differently, as a router from before named pools read ``ngram=HOST:PORT``) would run plain decoding and
    be reported under a drafter's name."""
    deadline = time.monotonic() + wait_s
    for name, address in routers.items():
        while (kinds := draft_kinds(address)) != plans[name].kinds and time.monotonic() < deadline:
            time.sleep(0.5)  # the router asks each draft for its info as it connects
        if kinds != plans[name].kinds:
            hint = " (does this router take named draft pools yet?)" if name == AUTO_BOTH else ""
            raise SystemExit(f"the router for {name} (--drafts {plans[name].drafts}) reports draft kinds "
                             f"{sorted(kinds)}, not {sorted(plans[name].kinds)}{hint}")


# ---------------------------------------------------------------------------------------------------------------
# the report


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    context: int
    batch: int
    config: str
    goodput: float  # decode tokens/s summed over the batch
    speedup: float | None  # over plain decoding in the same cell
    ttft_ms: float
    acceptance: float | None
    tokens_per_step: float | None
    best: bool = False  # the best sparse_self depth of its cell


Key = tuple[int, int, str]  # (context, batch, configuration)


def best_of(cells: dict[Key, Cell], context: int, batch: int, prefix: str) -> str | None:
    """The configuration named ``prefix ...`` with the highest goodput in the cell, if any ran."""
    names = [n for (c, b, n) in cells if (c, b) == (context, batch) and n.startswith(prefix)]
    return max(names, key=lambda n: cells[(context, batch, n)].goodput()) if names else None


def summarise(cells: dict[Key, Cell]) -> list[Row]:
    """The table's rows: per (context, batch), plain, the best ngram depth, every sparse_self depth (the best one
    marked), auto, and HF generate where it ran; speedups over plain in the same cell."""
    rows: list[Row] = []
    for context, batch in sorted({(c, b) for c, b, _ in cells}):
        plain = cells.get((context, batch, PLAIN))
        base = plain.goodput() if plain is not None else None
        best_ngram = best_of(cells, context, batch, "ngram d")
        best_sparse = best_of(cells, context, batch, "sparse_self d")
        names = [n for (c, b, n) in cells if (c, b) == (context, batch)]
        sparse = [n for n in names if n.startswith("sparse_self d")]  # in the order they ran: --sparse-depths'
        order = [PLAIN, *([best_ngram] if best_ngram else []), *sparse, AUTO_SPARSE, AUTO_BOTH, HF]
        for name in order:
            cell = cells.get((context, batch, name))
            if cell is None:
                continue
            goodput = cell.goodput()
            rows.append(Row(context, batch, name, goodput, goodput / base if base else None, cell.ttft_ms(),
                            cell.acceptance(), cell.tokens_per_step(), best=name == best_sparse))
    return rows


def _context_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def table(rows: Sequence[Row]) -> str:
    """Markdown, one row per (context, batch, configuration); the best sparse_self depth of each cell in bold."""
    lines = ["| context | batch | configuration | decode tokens/s | vs plain | TTFT ms | acceptance | tokens/step |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        name = f"**{r.config}**" if r.best else r.config
        lines.append(f"| {_context_label(r.context)} | {r.batch} | {name} | {r.goodput:.1f} | "
                     f"{'-' if r.speedup is None else f'{r.speedup:.2f}x'} | {r.ttft_ms:.0f} | "
                     f"{'-' if r.acceptance is None else f'{r.acceptance:.0%}'} | "
                     f"{'-' if r.tokens_per_step is None else f'{r.tokens_per_step:.2f}'} |")
    return "\n".join(lines)


def speedup_lines(rows: Sequence[Row], best_only: bool = True, config: str = "") -> dict[int, list[tuple[int, float]]]:
    """Per context, (batch, speedup over plain) in batch order: of the best sparse_self depth, or of ``config``."""
    lines: dict[int, list[tuple[int, float]]] = {}
    for r in rows:
        if r.speedup is not None and (r.best if best_only else r.config == config):
            lines.setdefault(r.context, []).append((r.batch, r.speedup))
    return {c: sorted(points) for c, points in sorted(lines.items())}


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """Speedup over plain decoding against batch size, one line per context: the best sparse_self depth (solid)
    and auto with the sparse_self pool (dashed, same colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    autos = speedup_lines(rows, best_only=False, config=AUTO_SPARSE)
    batches: set[int] = set()
    for (context, points), colour in zip(speedup_lines(rows).items(), plt.rcParams["axes.prop_cycle"].by_key()["color"],
                                         strict=False):
        xs, ys = zip(*points, strict=True)
        batches |= set(xs)
        ax.plot(xs, ys, marker="o", color=colour, label=f"{_context_label(context)} tokens, best sparse_self depth")
        if context in autos:
            ax_xs, ax_ys = zip(*autos[context], strict=True)
            ax.plot(ax_xs, ax_ys, marker="x", linestyle="--", color=colour, alpha=0.7,
                    label=f"{_context_label(context)} tokens, auto")
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(batches), [str(b) for b in sorted(batches)])
    ax.set_xlabel("batch size (requests sent at once)")
    ax.set_ylabel("decode goodput / plain decoding's")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def agreement_until_eos(ours: list[int], theirs: list[int], eos_ids: set[int]) -> bool:
    """Whether two greedy outputs agree up to ours' first end-of-sequence token: HF is asked for a fixed length by
    suppressing EOS, specfleet by ignoring it, so their tokens part there."""
    end = next((i for i, t in enumerate(ours) if t in eos_ids), len(ours))
    return ours[:end] == theirs[:end]


# ---------------------------------------------------------------------------------------------------------------
# running


class Progress:
    """Lines on stderr: what runs now, and the time since the start."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        print(f"[{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}] {message}", file=sys.stderr,
              flush=True)


def hf_reference(prompts: dict[int, list[Prompt]], max_new_tokens: int, progress: Progress) -> dict[Key, Cell]:
    """transformers' greedy generate at batch 1 over the batch-1 prompts of each context, each token's arrival timed
    by a streamer; fixed length (EOS suppressed by ``min_new_tokens``) like specfleet's ``ignore_eos``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from specfleet.models import resolve_model

    class Clock(BaseStreamer):
        """When generate hands over each new token (its first call is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32).eval()

    def timed(ids: list[int], new: int) -> Timed:
        clock = Clock()
        sent = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock)
        arrivals = [t - sent for t in clock.times[1:]]
        return Timed(out[0, len(ids):].tolist(), arrivals[0], 1, arrivals[-1])

    timed(next(iter(prompts.values()))[0].ids[:64], 4)  # warm-up: the first generate pays one-time costs
    cells: dict[Key, Cell] = {}
    for context, batch_prompts in prompts.items():
        progress(f"HF generate, context {context}, {len(batch_prompts)} prompt(s)")
        cells[(context, 1, HF)] = Cell([[timed(p.ids, max_new_tokens)] for p in batch_prompts])
    return cells


@dataclass
class Plan:
    contexts: list[int]
    batches: list[int]
    prompts_per_cell: int
    max_new_tokens: int
    ngram_depths: list[int]
    sparse_depths: list[int]
    both_pools: bool
    prefix_reuse: bool = True
    sparse_dtype: str = "float32"


def run_specfleet(plan: Plan, prompts: dict[int, list[Prompt]], decode: Callable[[list[int]], str],
                  cells: dict[Key, Cell], progress: Progress, log_dir: Path | None,
                  on_cell: Callable[[], None]) -> None:
    """Starts the services and routers, then measures every configuration at every (context, batch) into ``cells``,
    calling ``on_cell`` after each cell; raises ``NotLosslessError`` at the first speculative answer that differs."""
    with fleet(log_dir) as f:
        progress("starting redis, the target, the ngram and sparse_self drafts")
        redis = ["--redis-url", f.redis()]
        slots = ["--num-slots", str(max(plan.batches) + 2), "--max-seq-len", str(MODEL_CONTEXT)]
        reuse = ["--prefix-reuse", "on" if plan.prefix_reuse else "off"]
        target = f.start("target", ["--model", MODEL, *slots, *reuse, *redis], "target")
        ngram = f.start("draft", ["--drafter", "ngram", *redis], "draft-ngram")
        sparse = f.start("draft", ["--drafter", "sparse_self", "--model", MODEL, "--sparse-sinks", str(SPARSE_SINKS),
                                   "--sparse-window", str(SPARSE_WINDOW), "--dtype", plan.sparse_dtype, *slots,
                                   *redis], "draft-sparse-self")
        routers: dict[str, str] = {}
        plans = router_plans(plan.ngram_depths, plan.sparse_depths, plan.both_pools, ngram, sparse)
        for name, rp in plans.items():
            progress(f"starting the router for {name} (--drafts {rp.drafts or '(none)'} --depth {rp.depth})")
            try:
                routers[name] = f.router(target, rp.drafts, rp.depth,
                                         "router-" + re.sub(r"[^\w.-]+", "-", name).strip("-"), redis)
            except (RuntimeError, TimeoutError) as err:
                if name == AUTO_BOTH:
                    raise SystemExit(f"--both-pools: the router did not start with --drafts {rp.drafts}; it needs a "
                                     f"router that takes named draft pools\n{err}") from err
                raise
        # Warm-up: each router's first requests pay one-time costs (connections, the policy's first fit).
        warm = next(iter(prompts.values()))[0].ids[:64]
        for address in routers.values():
            send_batch(address, [warm], 4)
        check_pools(routers, plans)
        progress("warm; every router reaches the drafts it names")
        measuring = time.monotonic()
        total = sum(cell_work(c, rounds_for(plan.prompts_per_cell, b) * b) for c in plan.contexts for b in plan.batches)
        done = 0.0
        for context in plan.contexts:
            for batch in plan.batches:
                rounds = rounds_for(plan.prompts_per_cell, batch)
                for r in range(rounds):
                    group = prompts[context][r * batch: (r + 1) * batch]
                    ids = [p.ids for p in group]
                    if plan.prefix_reuse:  # so plain decodes, as the rest do, with no prompt of the batch prefilling
                        began = time.perf_counter()
                        prefilled = send_batch(routers[PLAIN], ids, 1)
                        cold_ms = 1000 * statistics.median(t.first_s for t in prefilled)
                        progress(f"context {context}, batch {batch}, round {r + 1}/{rounds}: prompts prefilled into "
                                 f"the target's cache, TTFT {cold_ms:.0f} ms (cold), "
                                 f"{time.perf_counter() - began:.0f} s")
                    for name, address in routers.items():
                        progress(f"context {context}, batch {batch}, round {r + 1}/{rounds}: {name}")
                        began = time.perf_counter()
                        answers = send_batch(address, ids, plan.max_new_tokens)
                        cells.setdefault((context, batch, name), Cell()).rounds.append(answers)
                        progress(f"  {name}: {sum(decode_goodput(t) or 0.0 for t in answers):.1f} decode tokens/s, "
                                 f"TTFT {1000 * statistics.median(t.first_s for t in answers):.0f} ms, "
                                 f"{time.perf_counter() - began:.0f} s")
                        if name != PLAIN:
                            check_identical(name, answers, cells[(context, batch, PLAIN)].rounds[-1], group, decode)
                        elif r == 0 and batch == plan.batches[0]:
                            progress(f"  plain decoding's answer to {group[0].label}: {decode(answers[0].tokens)!r}")
                on_cell()
                done += cell_work(context, rounds * batch)
                left = (time.monotonic() - measuring) / done * (total - done)
                progress(f"cell context {context} batch {batch} done; rough time left {left / 60:.0f} min (scaled by "
                         f"the prefill work done so far)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 7168],
                        help="prompt lengths in tokens, chat template included")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16], help="requests sent at once")
    parser.add_argument("--prompts", type=int, default=2, help="at least this many requests per cell, in whole "
                        "batches (the default: two at batch 1, one batch above)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ngram-depths", type=int, nargs="+", default=[2, 4], help="the table keeps the best")
    parser.add_argument("--sparse-depths", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--sparse-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the sparse_self draft's weights and cache (the target stays float32): bfloat16 drafts "
                             "faster on a CPU with bfloat16 instructions, a little less like the target")
    parser.add_argument("--both-pools", action="store_true", help="also auto with both pools, named (--drafts "
                        "ngram=HOST:PORT,sparse_self=HOST:PORT): the policy picks each sequence's pool every step")
    parser.add_argument("--source", choices=["both", "code", "sharegpt"], default="both",
                        help="documents: standard-library modules, ShareGPT conversations, or both in turn")
    parser.add_argument("--task", choices=["summarise", "continue"], default="summarise",
                        help="summarise: the document in a chat turn asking for a summary; continue: the bare "
                        "document, to be continued")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' batch-1 reference")
    parser.add_argument("--prefix-reuse", choices=["on", "off"], default="on", help="the target's --prefix-reuse: on, "
                        "each round prefills its prompts once and every configuration starts from them (TTFT then "
                        "leaves out the target's prefill); off, each configuration prefills them again, cold")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 512-token prompts, batch 1 and 2, "
                        "8 new tokens, sparse_self depths 1 and 2, the plot in a temporary folder")
    parser.add_argument("--plot", type=Path, help="where the PNG goes (default bench/long_context.png; with --quick, "
                        "the temporary folder)")
    parser.add_argument("--report-table", type=Path, help="also write the table here (rewritten after every cell)")
    parser.add_argument("--log-dir", type=Path, help="keep the services' logs here, at INFO")
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.batches, args.max_new_tokens, args.sparse_depths = [512], [1, 2], 8, [1, 2]
    if args.plot is None:
        args.plot = (Path(tempfile.gettempdir()) / "long_context_quick.png" if args.quick
                     else Path(__file__).parent / "long_context.png")
    too_long = [c for c in args.contexts if c + args.max_new_tokens > MODEL_CONTEXT]
    if too_long:
        parser.error(f"contexts {too_long} plus {args.max_new_tokens} new tokens exceed the model's {MODEL_CONTEXT}")
    plan = Plan(args.contexts, args.batches, args.prompts, args.max_new_tokens, args.ngram_depths, args.sparse_depths,
                args.both_pools, args.prefix_reuse == "on", args.sparse_dtype)
    progress = Progress()

    from specfleet.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(MODEL))

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids)

    progress("reading the documents")
    count = max(rounds_for(plan.prompts_per_cell, b) * b for b in plan.batches)
    sources: dict[str, tuple[Frame, Sequence[tuple[str, str]]]] = {}
    if args.source in ("both", "code"):
        sources["code"] = (_frame(tokenizer, args.task, "code"), stdlib_documents())
    if args.source in ("both", "sharegpt"):
        from bench.prompts import sharegpt_transcripts

        # Enough conversations that each gives a window at the longest context, at ~4 characters a token and then some.
        transcripts = sharegpt_transcripts(count, min_chars=5 * max(plan.contexts))
        sources["chat"] = (_frame(tokenizer, args.task, "chat"),
                           [(f"sharegpt#{i}", text) for i, text in enumerate(transcripts)])
    prompts = {c: build_prompts(sources, encode, c, count) for c in plan.contexts}
    for c in plan.contexts:
        progress(f"context {c}: " + ", ".join(p.label for p in prompts[c]))
    configs = len(router_plans(plan.ngram_depths, plan.sparse_depths, plan.both_pools, "", ""))
    requests = sum(rounds_for(plan.prompts_per_cell, b) * b for b in plan.batches)
    progress(f"{len(plan.contexts) * len(plan.batches)} cells x {configs} configurations: "
             f"{configs * requests * len(plan.contexts)} requests, "
             f"{(1 if plan.prefix_reuse else configs) * requests * sum(plan.contexts) / 1e6:.2f}M prompt tokens for "
             f"the target to prefill ({'once' if plan.prefix_reuse else 'every configuration prefills every prompt'}), "
             f"a sparse_self draft prefilling them in most configurations")
    batch_1 = {c: prompts[c][:rounds_for(plan.prompts_per_cell, 1)] for c in plan.contexts}

    cells: dict[Key, Cell] = {}
    if not args.no_hf and 1 in plan.batches:
        cells |= hf_reference(batch_1, plan.max_new_tokens, progress)  # first, and freed before the services start
        gc.collect()

    title = (f"SmolLM2-135M, greedy, {plan.max_new_tokens} new tokens, {args.task} "
             f"({'+'.join(sources)}), sparse_self {SPARSE_SINKS} sinks + {SPARSE_WINDOW} window"
             f"{', in bfloat16' if plan.sparse_dtype == 'bfloat16' else ''}")

    def report_so_far() -> None:
        if args.report_table is not None:
            args.report_table.parent.mkdir(parents=True, exist_ok=True)
            args.report_table.write_text(f"{title}\n\n{table(summarise(cells))}\n")

    try:
        run_specfleet(plan, prompts, decode, cells, progress, args.log_dir, report_so_far)
    except NotLosslessError:
        print(f"\nSTOPPED: a speculative answer differs from plain decoding's. Measured so far:\n\n"
              f"{table(summarise(cells))}", flush=True)
        raise
    rows = summarise(cells)
    reused = " (every row starts from the target's cached prompts)" if plan.prefix_reuse else ""
    print(f"\n{title}; decode tokens/s summed over the batch, median of rounds; TTFT median of requests{reused}; "
          f"best sparse_self depth in bold\n")
    print(table(rows))
    if HF in {n for _, _, n in cells}:
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        for c in plan.contexts:
            pairs = [(p[0], h[0]) for p, h in zip(cells[(c, 1, PLAIN)].rounds, cells[(c, 1, HF)].rounds, strict=True)]
            same = sum(agreement_until_eos(p.tokens, h.tokens, eos) for p, h in pairs)
            print(f"\n{_context_label(c)}: HF generate and plain decoding agree (up to EOS) on {same}/{len(pairs)} "
                  f"prompts")
    report_so_far()
    plot(rows, args.plot, "SmolLM2-135M + sparse_self: speedup over plain decoding")
    print(f"\nplot: {args.plot}")
    progress("done")


def _frame(tokenizer: ChatTokenizer, task: str, kind: str) -> Frame:
    return chat_frame(tokenizer, INSTRUCTIONS[kind]) if task == "summarise" else Frame()


if __name__ == "__main__":
    main()
