"""Goodput against batch size for fixed speculation depths and for the adaptive policy.

SmolLM2-135M target, ``ngram`` drafter, greedy, a fixed mixed prompt set (code edits and open questions).
For each batch size B, every policy serves the same fixed workload: ``--waves`` x B requests (prompts
taken in turn from the set; at least two requests per prompt), which B closed-loop clients take in order,
each sending its next request when its last one is answered. Greedy speculation is lossless, so every
policy must produce exactly the same tokens (the run stops if not).

Goodput is measured while all B clients are busy: from the first request until the first client finds none
left (the drain that follows is a smaller batch). Two measures of it:

- per request (the table's): B x the tokens of the requests that finished in that time over their summed
  durations, each request counted whole, its prompt's prefill and all its tokens;
- streamed: the tokens streamed in that time over its length. It undercounts policies whose requests do not
  finish together: when the time ends, the requests still in flight have had their prefills (a large part of
  a step here: 81 prompt tokens per 48 generated) but not yet all of their cheaper decode steps. Plain
  decoding keeps a wave of equal-length requests in lockstep, so for it the time ends with a whole wave
  done; with speculation requests finish at their own pace and up to B - 1 of them are cut short.

Policies run in turn, in a rotated order each round, and each cell is the median over rounds. Every
policy runs against the same target and draft services and shares one Redis, so ``auto`` sees the fleet's
measured costs and acceptance as it would in production.

A shared machine's speed drifts between rounds by more than the policies differ, so a third table blocks on
the round: each value over the geometric mean of all policies in its round (its batch size), median over rounds.
1.00 is the round's average policy; a machine that runs a whole round 30% slow moves none of them.

The full table's "best fixed depth" is the largest of seven noisy medians, so it sits above that depth's true
goodput, most where the depths are close: ``auto`` / best fixed is biased low. ``--versus B:D ...`` measures it
without that bias: given each batch size's best fixed depth from an earlier run, it serves only that depth and
``auto``, alternating which goes first, and prints the median over rounds of auto / depth D within each round
(the two served back to back). Every other depth still serves the warm-up pass, so Redis holds the same costs
as in a full run.

    python -m bench.adaptive                       # the full table and bench/adaptive.png
    python -m bench.adaptive --batch-sizes 1 8 --rounds 1   # a quick look
    python -m bench.adaptive --versus 1:4 2:3 4:6 8:0 16:0 32:0 --rounds 6   # auto against those depths
    python -m bench.adaptive --from-log run.log    # the tables again from a saved run's output
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import re
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.common import chat_ids, fleet
from bench.prompts import MIXED
from specfleet.models import load_tokenizer, resolve_model
from specfleet.protos import generate_pb2, generate_pb2_grpc

DEPTHS = [0, 1, 2, 3, 4, 6, 8]


@dataclass
class Served:
    outputs: list[list[int]]  # every request's tokens, in request order
    makespan_s: float  # first request sent to last answer
    request_tokens_per_s: float  # B x tokens / summed durations of the requests done while all were busy
    streamed_tokens_per_s: float  # tokens streamed while all clients were busy, over that time


def serve(address: str, requests: list[list[int]], batch: int, max_new_tokens: int) -> Served:
    """``batch`` closed-loop clients stream ``requests`` in order, each sending its next when its last one ends.

    Goodput at batch B is measured while B requests are in flight: from the start until the first client
    finds no request left (see the module's docstring for the two measures). After that the batch drains, and
    how long the drain takes depends on how far apart the last requests finish, not on the batch size.
    """
    outputs: list[list[int]] = [[] for _ in requests]
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * len(requests)  # (sent, answered) per request
    arrivals: list[tuple[float, int]] = []  # (time, tokens) of every streamed message; list.append is atomic
    taken = itertools.count()  # next() on a count is atomic under the GIL: each request goes to one client
    ran_dry: list[float] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with grpc.insecure_channel(address) as channel:
                stub = generate_pb2_grpc.GenerationServiceStub(channel)
                while (i := next(taken)) < len(requests):
                    request = generate_pb2.GenerateRequest()
                    request.token_ids.ids.extend(requests[i])
                    request.stopping.max_new_tokens = max_new_tokens
                    sent = time.perf_counter()
                    for message in stub.GenerateStream(request, timeout=1800):
                        arrivals.append((time.perf_counter(), len(message.token_ids)))
                        outputs[i].extend(message.token_ids)
                    spans[i] = (sent, time.perf_counter())
                ran_dry.append(time.perf_counter())
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(batch)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    makespan = time.perf_counter() - started
    if errors:
        raise errors[0]
    steady_end = min(ran_dry)
    done = [i for i, (_, answered) in enumerate(spans) if answered <= steady_end]
    per_request = batch * sum(len(outputs[i]) for i in done) / sum(spans[i][1] - spans[i][0] for i in done)
    streamed = sum(n for at, n in arrivals if at <= steady_end) / (steady_end - started)
    return Served(outputs, makespan, per_request, streamed)


Rounds = dict[str, list[float]]
"""Per policy, one goodput per round, in round order."""

ROUND_LINE = re.compile(r"batch +(\d+) round (\d+) +(?:depth (\d+)|(auto)): +([\d.]+) tokens/s per request, +"
                        r"([\d.]+) streamed")


def measure(routers: dict[str, str], prompts: list[list[int]], batch: int, waves: int, rounds: int,
            max_new_tokens: int, measured: list[str] | None = None) -> tuple[Rounds, Rounds]:
    """Goodput per policy and round at one batch size, per request and streamed, every policy serving the same
    requests. Only the ``measured`` policies (default: all) serve the measured rounds; all serve the warm-up."""
    # Every prompt at least twice: at small batch the requests cut at the end differ between policies (they
    # finish at their own pace), and with one pass that one or two prompts' acceptance would sway the cell.
    requests = [prompts[i % len(prompts)] for i in range(max(2 * len(prompts), waves * batch))]
    policies = list(routers)
    # A short unmeasured pass per policy: the services have seen this batch size, and Redis holds costs for it.
    for p in policies:
        serve(routers[p], requests[:batch], batch, max_new_tokens // 4)
    policies = measured or policies
    per_request: dict[str, list[float]] = {p: [] for p in policies}
    streamed: dict[str, list[float]] = {p: [] for p in policies}
    expected: list[list[int]] | None = None
    for r in range(rounds):
        for p in policies[r % len(policies):] + policies[:r % len(policies)]:
            served = serve(routers[p], requests, batch, max_new_tokens)
            outputs = served.outputs
            if expected is None:
                expected = outputs
            elif outputs != expected:
                wrong = next(i for i, (a, b) in enumerate(zip(outputs, expected, strict=True)) if a != b)
                raise AssertionError(f"policy {p} at batch {batch} changed request {wrong}'s tokens")
            per_request[p].append(served.request_tokens_per_s)
            streamed[p].append(served.streamed_tokens_per_s)
            print(f"  batch {batch:3d} round {r + 1}  {'depth ' + p if p != 'auto' else 'auto':>8}: "
                  f"{served.request_tokens_per_s:7.1f} tokens/s per request, {served.streamed_tokens_per_s:7.1f} "
                  f"streamed, with {batch} in flight; all {sum(map(len, outputs))} tokens in "
                  f"{served.makespan_s:.1f} s", flush=True)
    return per_request, streamed


def medians(rounds: Rounds) -> dict[str, float]:
    return {p: statistics.median(v) for p, v in rounds.items()}


def blocked_on_round(rounds: Rounds) -> dict[str, float]:
    """Each policy's median over rounds of its goodput relative to the geometric mean of its round."""
    count = min(map(len, rounds.values()))
    scale = [math.exp(statistics.mean(math.log(v[r]) for v in rounds.values())) for r in range(count)]
    return {p: statistics.median(v[r] / scale[r] for r in range(count)) for p, v in rounds.items()}


def parse_rounds(text: str) -> tuple[dict[int, Rounds], dict[int, Rounds]]:
    """The per-round goodputs (per request, streamed) of every batch size in a run's printed output."""
    per_request: dict[int, Rounds] = {}
    streamed: dict[int, Rounds] = {}
    for m in ROUND_LINE.finditer(text):
        batch, policy = int(m.group(1)), m.group(3) or m.group(4)
        per_request.setdefault(batch, {}).setdefault(policy, []).append(float(m.group(5)))
        streamed.setdefault(batch, {}).setdefault(policy, []).append(float(m.group(6)))
    return per_request, streamed


def parse_log(text: str) -> tuple[dict[int, Rounds], dict[int, Rounds]]:
    """As ``parse_rounds``, keeping only the batch sizes every policy has served (a run stopped part-way)."""
    per_request, streamed = parse_rounds(text)
    policies = set().union(*per_request.values())
    complete = [b for b, rounds in per_request.items() if set(rounds) == policies]
    return {b: per_request[b] for b in complete}, {b: streamed[b] for b in complete}


def is_versus(per_request: dict[int, Rounds]) -> bool:
    """Whether a parsed run is a ``--versus`` run: auto and one fixed depth per batch size, not all the same."""
    pairs = [frozenset(rounds) for rounds in per_request.values()]
    return bool(pairs) and all(len(p) == 2 and "auto" in p for p in pairs) and len(set(pairs)) > 1


def table(results: dict[int, dict[str, float]], policies: list[str], digits: int = 1) -> str:
    fixed = [p for p in policies if p != "auto"]
    lines = ["| batch | " + " | ".join(f"depth {p}" for p in fixed) + " | auto | auto / best fixed |",
             "| ---: | " + " | ".join("---:" for _ in fixed) + " | ---: | ---: |"]
    for batch, row in results.items():
        best = max(fixed, key=lambda p: row[p])
        cells = [f"**{row[p]:.{digits}f}**" if p == best else f"{row[p]:.{digits}f}" for p in fixed]
        lines.append(f"| {batch} | " + " | ".join(cells) + f" | {row['auto']:.{digits}f} | "
                     f"{row['auto'] / row[best]:.2f} |")
    means = {p: statistics.mean(row[p] for row in results.values()) for p in policies}
    lines.append("| mean | " + " | ".join(f"{means[p]:.{digits}f}" for p in fixed) + f" | {means['auto']:.{digits}f} | "
                 f"{means['auto'] / max(means[p] for p in fixed):.2f} |")
    return "\n".join(lines)


def report(per_request: dict[int, Rounds], streamed: dict[int, Rounds], header: str) -> dict[int, dict[str, float]]:
    """Prints the three tables; returns the per-request medians (for the plot)."""
    policies = list(next(iter(per_request.values())))
    policies = sorted((p for p in policies if p != "auto"), key=int) + ["auto"]
    results = {b: medians(r) for b, r in per_request.items()}
    print(header)
    print()
    print(table(results, policies))
    print()
    print("Streamed goodput (tokens streamed while all clients were busy, over that time; see the docstring)")
    print()
    print(table({b: medians(r) for b, r in streamed.items()}, policies))
    print()
    print("Per request, blocked on the round: goodput over the geometric mean of all policies in the same round "
          "(1.00: that round's average policy), median over rounds")
    print()
    print(table({b: blocked_on_round(r) for b, r in per_request.items()}, policies, digits=2))
    bias = selection_bias(per_request)
    print()
    print(f"Noise: a cell's rounds spread by {bias.cell_sd:.1%} (sd of log goodput). Were auto exactly as good as "
          f"each batch size's best fixed depth, medians of this many rounds would show it at 0.95 of the best or "
          f"more at every batch size in {bias.all_within:.0%} of runs (per batch size: "
          + ", ".join(f"{b} {p:.0%}" for b, p in bias.within.items()) + "); see --versus.")
    return results


@dataclass
class SelectionBias:
    cell_sd: float  # pooled sd of log goodput over a cell's rounds
    within: dict[int, float]  # per batch size: chance that auto / best fixed >= 0.95 if auto is the best
    all_within: float  # chance of that at every batch size at once


def selection_bias(per_request: dict[int, Rounds], trials: int = 4000, seed: int = 0) -> SelectionBias:
    """How often the full table shows ``auto`` within 5% of the best fixed depth when it is exactly as good.

    A simulation: every fixed depth's true goodput is its median here, ``auto``'s equals the best of them, and
    each round of each cell is off by log-normal noise with the spread the cells' rounds show. The table's best
    fixed depth is the largest of several noisy medians, so it sits above the truth most where depths are close.
    """
    deviations = []
    for rounds in per_request.values():
        for values in rounds.values():
            centre = statistics.mean(math.log(v) for v in values)
            deviations += [math.log(v) - centre for v in values]
    count = min(len(v) for rounds in per_request.values() for v in rounds.values())
    if count < 2:
        return SelectionBias(0.0, dict.fromkeys(per_request, 1.0), 1.0)
    cell_sd = math.sqrt(sum(d * d for d in deviations) / len(deviations) * count / (count - 1))
    rng = random.Random(seed)

    def noisy_median(truth: float) -> float:
        return statistics.median(truth * math.exp(rng.gauss(0.0, cell_sd)) for _ in range(count))

    truths = {b: [statistics.median(v) for p, v in rounds.items() if p != "auto"] for b, rounds in per_request.items()}
    hits = {b: 0 for b in per_request}
    every = 0
    for _ in range(trials):
        all_hit = True
        for batch in per_request:
            hit = noisy_median(max(truths[batch])) >= 0.95 * max(noisy_median(t) for t in truths[batch])
            hits[batch] += hit
            all_hit &= hit
        every += all_hit
    return SelectionBias(cell_sd, {b: h / trials for b, h in hits.items()}, every / trials)


@dataclass
class Versus:
    """Auto against one fixed depth at one batch size."""

    depth: str
    fixed: float  # the depth's median goodput over rounds
    auto: float  # auto's
    ratios: list[float]  # auto / depth within each round

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


def versus(rounds: Rounds) -> Versus:
    """Auto against the one fixed depth of a ``--versus`` batch size, paired round by round."""
    depth = next(p for p in rounds if p != "auto")
    ratios = [a / f for a, f in zip(rounds["auto"], rounds[depth], strict=False)]
    return Versus(depth, statistics.median(rounds[depth]), statistics.median(rounds["auto"]), ratios)


def report_versus(per_request: dict[int, Rounds], header: str) -> None:
    print(header)
    print()
    print("| batch | fixed depth | its goodput | auto | auto / fixed, median of rounds | per round |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for batch, rounds in per_request.items():
        v = versus(rounds)
        print(f"| {batch} | {v.depth} | {v.fixed:.1f} | {v.auto:.1f} | {v.ratio:.2f} | "
              f"{', '.join(f'{r:.2f}' for r in v.ratios)} |")


def versus_depths(pairs: list[str]) -> dict[int, str]:
    """``B:D`` arguments as {batch size: fixed depth}."""
    try:
        return {int(b): str(int(d)) for b, d in (pair.split(":") for pair in pairs)}
    except ValueError as err:
        raise SystemExit(f"--versus takes BATCH:DEPTH pairs such as 8:0, not {' '.join(pairs)}") from err


def plot(results: dict[int, dict[str, float]], policies: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in policies:
        style = dict(linewidth=2.5, color="black") if p == "auto" else dict(linewidth=1, alpha=0.8)
        ax.plot(batches, [results[b][p] for b in batches], marker="o", label=p if p == "auto" else f"depth {p}",
                **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (requests in flight)")
    ax.set_ylabel("goodput per request (generated tokens/s)")
    ax.set_title("SmolLM2-135M + ngram drafter: fixed depths vs auto")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--depths", type=int, nargs="+", default=DEPTHS)
    parser.add_argument("--waves", type=int, default=2, help="requests per configuration: waves x batch size")
    parser.add_argument("--rounds", type=int, default=2, help="each cell is the median over this many rounds")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent / "adaptive.png",
                        help="where the PNG goes (the README shows bench/adaptive.png)")
    parser.add_argument("--versus", nargs="+", metavar="B:D",
                        help="measure only auto and fixed depth D at each batch size B (the best fixed depths of an "
                        "earlier run), and print auto / D within each round; see the docstring")
    parser.add_argument("--from-log", type=Path, help="print the tables from a saved run's output instead of running")
    parser.add_argument("--log-dir", type=Path, help="keep the services' logs here, at INFO (the router's depth "
                        "decisions too); by default they go to a temporary folder that is removed")
    args = parser.parse_args()
    if args.from_log is not None:
        text = args.from_log.read_text()
        if is_versus(rounds := parse_rounds(text)[0]):
            report_versus(rounds, f"Auto against one fixed depth per batch size, from {args.from_log}")
            return
        per_request, streamed = parse_log(text)
        if not per_request:
            parser.error(f"{args.from_log} has no per-round lines of this bench")
        report(per_request, streamed, f"Goodput per request (generated tokens/s) from {args.from_log}, median over "
               "rounds; best fixed depth in bold")
        return

    paired = versus_depths(args.versus) if args.versus else {}
    if paired:
        args.batch_sizes = list(paired)
        args.depths = sorted(set(args.depths) | {int(d) for d in paired.values()})
    spec = "smollm2-135m"
    prompts = [chat_ids(load_tokenizer(resolve_model(spec)), p) for p in MIXED]
    policies = [str(d) for d in args.depths] + ["auto"]
    per_request: dict[int, Rounds] = {}
    streamed: dict[int, Rounds] = {}
    with fleet(args.log_dir) as f:
        redis = ["--redis-url", f.redis()]
        slots = ["--num-slots", str(max(args.batch_sizes) + 4), "--max-seq-len", "1024"]
        target = f.start("target", ["--model", spec, *slots, *redis], "target")
        draft = f.start("draft", ["--drafter", "ngram", *redis], "draft")
        routers = {p: f.router(target, draft if p != "0" else None, p, f"router-{p}",
                               [*redis, "--max-queue", "4096"]) for p in policies}
        for batch in args.batch_sizes:
            per_request[batch], streamed[batch] = measure(routers, prompts, batch, args.waves, args.rounds,
                                                          args.max_new_tokens,
                                                          [paired[batch], "auto"] if paired else None)
    print()
    if paired:
        report_versus(per_request, f"Auto against one fixed depth per batch size (goodput per request, generated "
                      f"tokens/s), {args.max_new_tokens} new tokens per request, {args.waves} x batch requests per "
                      f"cell, {args.rounds} round(s), alternating which goes first")
        return
    results = report(per_request, streamed,
                     f"Goodput per request (generated tokens/s), SmolLM2-135M target, ngram drafter, greedy, "
                     f"{args.max_new_tokens} new tokens per request, {args.waves} x batch requests per cell, "
                     f"median of {args.rounds} round(s); best fixed depth in bold")
    plot(results, policies, args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
