"""Draft trees from the llamacpp drafter (real SmolLM2-135M Q4_1 GGUF): each tree is the one its builder draws from
each path's own logits, computed afresh for the reference; a tree leaves its sequence holding the committed tokens
and the scratch slots empty; trees wider than the scratch slots are built a few sequences at a time, or as chains."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from specfleet.drafters.base import DraftRequest, DraftResult
from specfleet.drafters.llamacpp import LlamaCppDrafter
from specfleet.drafters.tree_drafting import build_tree, tree_logprobs, tree_result, tree_shapes
from specfleet.engine.runner import Extend
from specfleet.llamacpp import LlamaCppRunner
from specfleet.sampling_params import SamplingParams
from specfleet.trees.shapes import TreeShape

pytestmark = pytest.mark.real_model

THREADS = 1
MAX_SEQ_LEN = 256
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0, top_k=16)
SHAPES = {"duo": TreeShape("duo", (4, 1, 1)), "rsd-c": TreeShape("rsd-c", (2, 2, 1)),
          "rsd-s": TreeShape("rsd-s", beam_width=3, depth=3), "iid": TreeShape("iid", (2, 2))}


@pytest.fixture(scope="module")
def drafter(smollm2_gguf: Path) -> Iterator[LlamaCppDrafter]:
    drafter = LlamaCppDrafter(smollm2_gguf, num_slots=8, max_seq_len=MAX_SEQ_LEN, threads=THREADS, tree_slots=8)
    yield drafter
    drafter.close()


@pytest.fixture(scope="module")
def alone(smollm2_gguf: Path) -> Iterator[LlamaCppRunner]:
    """A separate llama.cpp context that computes each path from scratch: the prompt and the path in one decode."""
    runner = LlamaCppRunner(smollm2_gguf, num_slots=1, max_seq_len=MAX_SEQ_LEN, threads=THREADS)
    yield runner
    runner.close()


def ask(seq_id: str, tokens: list[int], shape: TreeShape | None, sampling: SamplingParams, depth: int = 3,
        rollback_to: int = 0) -> DraftRequest:
    return DraftRequest(seq_id, rollback_to, tokens[rollback_to:], depth, sampling, seed=5, tree=shape)


def reference_trees(alone: LlamaCppRunner, requests: list[DraftRequest], contexts: list[list[int]],
                    num_pairs: int) -> list[DraftResult]:
    """The trees the builders draw when every path's logits come from its whole context decoded afresh."""
    results = []
    for shape, group in tree_shapes(requests).items():

        def draft_logprobs(rows: torch.Tensor, paths: torch.Tensor, group: list[DraftRequest] = group
                           ) -> torch.Tensor:
            logits = []
            for row, path in zip(rows.tolist(), paths.tolist(), strict=True):
                context = contexts[requests.index(group[row])] + path
                (last,) = alone.extend([Extend("path", 0, context)])
                alone.release(["path"])
                logits.append(last[0])
            return tree_logprobs([group[row].sampling for row in rows.tolist()], torch.stack(logits), num_pairs)

        tree = build_tree(shape, group, draft_logprobs, alone.vocab_size)
        results += [tree_result(r, tree, row, num_pairs, r.position) for row, r in enumerate(group)]
    return sorted(results, key=lambda result: [r.seq_id for r in requests].index(result.seq_id))


def assert_same_tree(got: DraftResult, expected: DraftResult) -> None:
    assert got.parents is not None and got.parents == expected.parents
    assert got.tokens == expected.tokens
    assert got.cached_len == expected.cached_len
    if expected.draft_top_k is None:
        assert got.draft_top_k is None
    else:
        assert torch.equal(got.draft_top_k[0], expected.draft_top_k[0])
        torch.testing.assert_close(got.draft_top_k[1], expected.draft_top_k[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("method", sorted(SHAPES))
def test_each_tree_is_drawn_from_each_paths_own_logits(drafter, alone, short_prompts, method: str,
                                                       sampling: SamplingParams) -> None:
    """Batched, the sequences' branches grow on copies of their caches; the trees equal those built from every
    path's whole context decoded afresh: node for node, and (sampled) each node's q."""
    requests = [ask(f"{method}-{i}", p, SHAPES[method], sampling) for i, p in enumerate(short_prompts)]
    got = drafter.propose(requests)
    for result, expected in zip(got, reference_trees(alone, requests, short_prompts, drafter.num_pairs), strict=True):
        assert_same_tree(result, expected)
    assert any(len(set(r.parents)) < len(r.parents) for r in got), "no tree here branched"
    drafter.release([r.seq_id for r in requests])


def test_a_tree_leaves_only_the_committed_tokens_behind(drafter, alone, short_prompts) -> None:
    """After a tree the sequence holds its committed tokens, the scratch slots nothing; its next call (a
    rollback into the prompt and new tokens) drafts what a fresh sequence with that context drafts."""
    prompt = short_prompts[0]
    (tree,) = drafter.propose([ask("t", prompt, SHAPES["duo"], GREEDY)])
    assert tree.cached_len == drafter.cached_len("t") == len(prompt)
    assert all(drafter.runner._lengths[slot] == 0 for slot in drafter.runner.scratch_slots)

    context = prompt[:-2] + [tree.tokens[0], 13]
    (chain,) = drafter.propose([ask("t", context, None, GREEDY, depth=4, rollback_to=len(prompt) - 2)])
    (fresh,) = drafter.propose([ask("fresh", context, None, GREEDY, depth=4)])
    assert chain.tokens == fresh.tokens and chain.parents is None
    # The chain's drafts rolled back, a tree again.
    request = ask("t", context, SHAPES["rsd-c"], SAMPLED, rollback_to=len(context) - 1)
    (again,) = drafter.propose([request])
    (expected,) = reference_trees(alone, [request], [context], drafter.num_pairs)
    assert_same_tree(again, expected)
    drafter.release(["t", "fresh"])


def test_trees_wider_than_the_scratch_slots_are_built_in_turn_or_as_chains(smollm2_gguf: Path, drafter, short_prompts
                                                                          ) -> None:
    """Four sequences of 4-branch trees on 4 scratch slots: built one sequence at a time, the same trees. On 2 slots
    a 4-branch tree cannot grow: each request gets a chain of the tree's levels."""
    requests = [ask(f"w{i}", p, SHAPES["duo"], SAMPLED) for i, p in enumerate(short_prompts)]
    ample = drafter.propose(requests)
    drafter.release([r.seq_id for r in requests])
    narrow = LlamaCppDrafter(smollm2_gguf, num_slots=4, max_seq_len=MAX_SEQ_LEN, threads=THREADS, tree_slots=4)
    try:
        for got, expected in zip(narrow.propose(requests), ample, strict=True):
            assert_same_tree(got, expected)
    finally:
        narrow.close()
    chains_only = LlamaCppDrafter(smollm2_gguf, num_slots=4, max_seq_len=MAX_SEQ_LEN, threads=THREADS, tree_slots=2)
    try:
        trees = [ask(f"c{i}", p, SHAPES["duo"], GREEDY) for i, p in enumerate(short_prompts)]
        for got, p in zip(chains_only.propose(trees), short_prompts, strict=True):
            (chain,) = drafter.propose([ask("chain", p, None, GREEDY, depth=3)])
            drafter.release(["chain"])
            assert got.parents is None and got.tokens == chain.tokens
    finally:
        chains_only.close()
