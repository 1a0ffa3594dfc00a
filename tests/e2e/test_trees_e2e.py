"""Draft trees through the real three-process deployment on the real SmolLM2: greedy trees give the
tokens of plain greedy decoding, batched; a sampled tree run with a seed is reproducible."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from specfleet.client import make_request, stream
from specfleet.models import load_tokenizer

pytestmark = pytest.mark.real_model

MAX_NEW = 32
PROMPTS = [
    "Rename the variable x to count in this code:\ndef f(x):\n    x = x + 1\n    return x * x\n",
    "Write a Python function that reverses a string.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "List three colors of the rainbow.",
]


@pytest.fixture(scope="module")
def prompt_ids(smollm2_dir: Path) -> list[list[int]]:
    tokenizer = load_tokenizer(smollm2_dir)
    return [tokenizer.encode(p) for p in PROMPTS]


def _generate_all(address: str, prompt_ids: list[list[int]], **request) -> list[list[int]]:
    """All prompts in flight at once, so every step batches them."""
    def one(ids: list[int]) -> list[int]:
        messages = stream(address, make_request(ids, max_new_tokens=MAX_NEW, **request), timeout_s=300)
        return [t for m in messages for t in m.token_ids]

    with ThreadPoolExecutor(len(prompt_ids)) as pool:
        return list(pool.map(one, prompt_ids))


@pytest.fixture(scope="module")
def plain(cluster, prompt_ids) -> list[list[int]]:
    """Plain greedy decoding through the target alone (depth 0)."""
    return _generate_all(cluster.router("router-plain", target="target", draft=None, depth=0), prompt_ids)


@pytest.mark.parametrize(("drafter", "tree", "depth"), [
    ("ngram", ["--tree", "rsd-c", "--tree-branching", "3,2,2,1"], 4),
    ("tiny", ["--tree", "rsd-c", "--tree-branching", "2,2,1"], 3),
    ("tiny", ["--tree", "rsd-s", "--beam-width", "3", "--max-depth", "4"], 4),
    ("ngram", ["--tree", "rsd-s", "--beam-width", "2", "--max-tree-nodes", "12"], "auto"),
    ("tiny", ["--tree", "duo", "--tree-branching", "4", "--max-depth", "3"], 3),
    ("tiny", ["--tree", "duo", "--tree-branching", "4", "--max-tree-nodes", "12"], "auto"),
    ("llamacpp", ["--tree", "duo", "--tree-branching", "4", "--max-depth", "3"], 3),
    ("llamacpp", ["--tree", "rsd-c", "--tree-branching", "2,2,1"], "auto"),
])
def test_greedy_trees_equal_plain_decoding(cluster, drafter: str, tree: list[str], depth: int | str, prompt_ids,
                                           plain, request: pytest.FixtureRequest) -> None:
    if drafter == "llamacpp":  # SmolLM2's Q4_1 GGUF in llama.cpp, its branches on copies of a sequence's cache
        request.getfixturevalue("llamacpp_draft")
    name = f"router-tree-{drafter}-{'-'.join(tree[1::2])}-{depth}"
    address = cluster.router(name, target="target", draft=drafter, depth=depth, extra=tree)
    assert _generate_all(address, prompt_ids) == plain


def test_sampled_trees_with_a_seed_are_reproducible(cluster, prompt_ids) -> None:
    """Same seed, same drafts, same tokens. (Lossless sampling makes other drafts give other tokens of the
    same distribution, so a Propose dropped for its timeout on a busy machine must not happen here.) On a target
    without prefix reuse: a cold prefill computes a prompt's last tokens in a wide pass, a reused prompt's in a
    narrow one, and the CPU kernels chosen for the two widths round differently (README, "What it guarantees"),
    which a sampled near-tie can turn into another token."""
    if "target-no-reuse" not in cluster.addresses:
        cluster.start("target-no-reuse", "target", [*cluster.target_args, "--prefix-reuse", "off"])
    address = cluster.router("router-tree-tiny-sampled", target="target-no-reuse", draft="tiny", depth=3,
                             extra=["--tree", "rsd-c", "--tree-branching", "2,2,1", "--draft-timeout-ms", "600000"])
    first = _generate_all(address, prompt_ids[:3], temperature=1.0, seed=11, ignore_eos=True)
    again = _generate_all(address, prompt_ids[:3], temperature=1.0, seed=11, ignore_eos=True)
    assert first == again and all(len(t) == MAX_NEW for t in first)
