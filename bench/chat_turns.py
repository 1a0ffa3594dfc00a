"""A chat's next turns over a long conversation: what prefix reuse saves in time to the first token.

Chat clients resend the whole conversation every turn. Each conversation here opens with a standard-library module of
``--context`` tokens in a user turn that asks for a summary, is answered with ``--max-new-tokens`` tokens (EOS
ignored), and goes on for ``--turns`` turns, each a short question after the last answer; every turn is sent as the
whole conversation so far (token ids: the last turn's prompt, its answer, then the chat template's end of turn and
the next user turn, so a turn's prompt extends the last one's sequence exactly). The conversations are taken in
turn (all first turns, then all second turns, ...), as a server sees several users at once.

Configurations, each its own fleet (Redis, target, draft, router), one after another, so that no cache outlives its
configuration:

- ``plain, no reuse``: depth 0, the target with ``--prefix-reuse off``;
- ``plain``: depth 0, the target reusing prefixes;
- ``sparse_self dK, draft not reusing``: the sparse_self drafter at depth K (``--depth``), the target reusing, the
  draft prefilling every turn's whole conversation again through its chunked prefill;
- ``sparse_self dK``: both reusing (the draft continues from where the last turn's sequence ended).

Per turn, medians over the conversations: TTFT and decode goodput (tokens after the first message over the time from
it to the last token). Every configuration's answers must equal the first's token for token.

    python -m bench.chat_turns                  # 3 conversations of 3 turns from 3K-token modules, depth 2
    python -m bench.chat_turns --quick          # a smoke test: 2 conversations, 2 turns, 512 tokens
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.common import fleet
from bench.long_context import (
    MODEL,
    MODEL_CONTEXT,
    ChatTokenizer,
    Timed,
    chat_frame,
    decode_goodput,
    document_windows,
    stdlib_documents,
    stream_timed,
)

QUESTIONS = (
    "Which function in it would you test first, and why?",
    "Explain your last answer in more detail.",
    "Write a short docstring for its main class.",
    "What would you rename, and to what?",
)
MARKER_ANSWER = "<<<ANSWER>>>"


@dataclass(frozen=True)
class Config:
    name: str
    depth: int  # 0: plain decoding, no draft
    target_reuse: bool
    draft_reuse: bool = False


def configs(depth: int) -> list[Config]:
    return [Config("plain, no reuse", 0, target_reuse=False), Config("plain", 0, target_reuse=True),
            Config(f"sparse_self d{depth}, draft not reusing", depth, target_reuse=True, draft_reuse=False),
            Config(f"sparse_self d{depth}", depth, target_reuse=True, draft_reuse=True)]


def next_user_turn(tokenizer: ChatTokenizer, question: str) -> list[int]:
    """The tokens that follow an assistant's answer under the model's chat template: the end of its turn, then a user
    turn asking ``question``, then the assistant's turn opened."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "?"}, {"role": "assistant", "content": MARKER_ANSWER},
         {"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    _, marker, after = text.partition(MARKER_ANSWER)
    if not marker:
        raise ValueError("the chat template must hold the assistant's answer")
    return tokenizer.encode(after, add_special_tokens=False)


@dataclass
class Results:
    """Per configuration, per turn, the conversations' requests."""

    turns: dict[str, list[list[Timed]]] = field(default_factory=dict)

    def ttft_ms(self, config: str, turn: int) -> float:
        return 1000 * statistics.median(t.first_s for t in self.turns[config][turn])

    def goodput(self, config: str, turn: int) -> float:
        return statistics.median(decode_goodput(t) or 0.0 for t in self.turns[config][turn])


def run_config(config: Config, openings: list[list[int]], follow_ups: list[list[int]], max_new_tokens: int,
               expected: list[list[Timed]] | None) -> list[list[Timed]]:
    """Every conversation's turns through a fresh fleet; raises if an answer differs from ``expected``'s."""
    turns: list[list[Timed]] = []
    with fleet() as f:
        redis = ["--redis-url", f.redis()]
        slots = ["--num-slots", str(len(openings) + 2), "--max-seq-len", str(MODEL_CONTEXT)]
        target = f.start("target", ["--model", MODEL, *slots, "--prefix-reuse", "on" if config.target_reuse else "off",
                                    *redis], "target")
        draft = None
        if config.depth:
            draft = f.start("draft", ["--drafter", "sparse_self", "--model", MODEL, *slots, "--prefix-reuse",
                                      "on" if config.draft_reuse else "off", *redis], "draft")
        router = f.router(target, draft, config.depth, "router", redis)
        stream_timed(router, [1, 2, 3], 4)  # the router's first request pays its connections
        prompts = [list(ids) for ids in openings]
        for turn in range(len(follow_ups) + 1):
            if turn:
                prompts = [p + t.tokens + follow_ups[turn - 1] for p, t in zip(prompts, turns[-1], strict=True)]
            turns.append([])
            for c, ids in enumerate(prompts):
                timed = stream_timed(router, ids, max_new_tokens)
                print(f"  {config.name:<36} turn {turn + 1} conversation {c + 1}: {len(ids):5d} prompt tokens, "
                      f"TTFT {timed.first_s:6.2f} s, {decode_goodput(timed) or 0:5.1f} tokens/s", flush=True)
                if expected is not None and timed.tokens != expected[turn][c].tokens:
                    raise AssertionError(f"{config.name}, turn {turn + 1}, conversation {c + 1}: the answer differs "
                                         "from the first configuration's")
                turns[-1].append(timed)
    return turns


def table(results: Results, names: Sequence[str], turns: int) -> str:
    lines = ["| configuration | " + " | ".join(f"turn {t + 1} TTFT (ms)" for t in range(turns)) +
             " | " + " | ".join(f"turn {t + 1} tokens/s" for t in range(turns)) + " |",
             "| --- |" + " ---: |" * (2 * turns)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{results.ttft_ms(name, t):.0f}" for t in range(turns)) + " | " +
                     " | ".join(f"{results.goodput(name, t):.1f}" for t in range(turns)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=3072, help="tokens of the first turn, chat template included")
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--turns", type=int, default=3, help=f"1 to {len(QUESTIONS) + 1}")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2, help="the sparse_self configurations' fixed depth")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 conversations of 2 turns, 512 tokens, "
                        "8 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.context, args.conversations, args.turns, args.max_new_tokens = 512, 2, 2, 8
    if not 1 <= args.turns <= len(QUESTIONS) + 1:
        parser.error(f"--turns: 1 to {len(QUESTIONS) + 1}, got {args.turns}")
    longest = args.context + args.turns * (args.max_new_tokens + 40)
    if longest > MODEL_CONTEXT:
        parser.error(f"the last turn would hold about {longest} tokens, more than the model's {MODEL_CONTEXT}")

    from specfleet.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(MODEL))
    frame = chat_frame(tokenizer, "Summarise what this code does.")
    windows = document_windows(stdlib_documents(), lambda text: tokenizer.encode(text, add_special_tokens=False),
                               frame.document_tokens(args.context), per_document=1)
    openings = []
    for label, ids in windows:
        openings.append(frame.wrap(ids, args.context))
        print(f"conversation {len(openings)}: {label}", flush=True)
        if len(openings) == args.conversations:
            break
    follow_ups = [next_user_turn(tokenizer, q) for q in QUESTIONS[: args.turns - 1]]

    results = Results()
    started = time.monotonic()
    expected = None
    for config in configs(args.depth):
        results.turns[config.name] = run_config(config, openings, follow_ups, args.max_new_tokens, expected)
        expected = expected or results.turns[config.name]
    print(f"\nSmolLM2-135M, greedy, {args.conversations} conversations of {args.turns} turns, the first "
          f"{args.context} tokens, {args.max_new_tokens} new tokens a turn; TTFT median over conversations, decode "
          f"tokens/s median over conversations ({time.monotonic() - started:.0f} s in all)\n")
    print(table(results, list(results.turns), args.turns))


if __name__ == "__main__":
    main()
