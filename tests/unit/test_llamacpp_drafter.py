"""The llamacpp drafter on the real SmolLM2-135M GGUF (Q4_1): its drafts against llama.cpp's own greedy decoding,
batching and rollback, sampled drafts' q, sessions (unknown, release, LRU eviction), and the draft service over gRPC
with the router's tokenizer check."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from llama_cpp_reference import llama_cpp_greedy

from draft_service.server import build_servicer
from router.draft_link import GrpcDraftLink
from router.replicas import DraftReplica, ReplicaInfo, TargetReplica, check_compatible
from specfleet.config import DraftConfig
from specfleet.drafters.base import DraftRequest
from specfleet.drafters.llamacpp import LlamaCppDrafter
from specfleet.llamacpp import available_cores
from specfleet.models import load_tokenizer, tokenizer_fingerprint
from specfleet.protos import draft_pb2_grpc
from specfleet.sampling import processed_probs, top_k_pairs
from specfleet.sampling_params import SamplingParams
from specfleet.speculation import DraftAsk, DraftPlan, SessionDelta
from specfleet.trees.shapes import TreeShape

pytestmark = pytest.mark.real_model

GREEDY = SamplingParams()
# One thread: on a busy machine llama.cpp's threads wait for each other at every barrier (seconds per decode).
THREADS = 1


@pytest.fixture(scope="module")
def drafter(smollm2_gguf: Path) -> Iterator[LlamaCppDrafter]:
    drafter = LlamaCppDrafter(smollm2_gguf, num_slots=8, max_seq_len=256, threads=THREADS)
    yield drafter
    drafter.close()


@pytest.fixture(scope="module")
def reference(smollm2_gguf: Path, short_prompts: list[list[int]]
              ) -> dict[tuple[int, ...], tuple[list[int], np.ndarray]]:
    """llama.cpp's own greedy continuation of each prompt, and its logits after the prompt."""
    return {tuple(p): (tokens, logits[0])
            for p in short_prompts for tokens, logits in [llama_cpp_greedy(smollm2_gguf, p, 8)]}


def ask(seq_id: str, rollback_to: int, new_tokens: list[int], depth: int, sampling: SamplingParams = GREEDY,
        seed: int = 0, tree: TreeShape | None = None) -> DraftRequest:
    return DraftRequest(seq_id, rollback_to, list(new_tokens), depth, sampling, seed, tree)


def fresh(drafter: LlamaCppDrafter, tokens: list[int], depth: int, sampling: SamplingParams = GREEDY,
          seed: int = 0):
    """The draft after ``tokens`` on a sequence made for it, then released."""
    (result,) = drafter.propose([ask("fresh", 0, tokens, depth, sampling, seed)])
    assert drafter.release(["fresh"]) == 1
    return result


def test_greedy_drafts_are_llama_cpps_own_greedy_continuation(drafter, short_prompts, reference) -> None:
    for prompt in short_prompts:
        result = fresh(drafter, prompt, 8)
        assert result.known and result.draft_top_k is None and result.parents is None
        assert result.tokens == reference[tuple(prompt)][0]
        # It holds the prompt and the drafts it fed itself: all but the last.
        assert result.cached_len == len(prompt) + 7


def test_batched_and_rolled_back_sequences_draft_as_fresh_ones(drafter, short_prompts) -> None:
    alone = [fresh(drafter, p, 5).tokens for p in short_prompts]
    batched = drafter.propose([ask(f"b{i}", 0, p, 5) for i, p in enumerate(short_prompts)])
    assert [r.tokens for r in batched] == alone
    assert [r.cached_len for r in batched] == [len(p) + 4 for p in short_prompts]

    # Each sequence goes on at once: two drafts accepted and a correction, or all rejected after a longer
    # rollback into its prompt, or (depth 0) nothing drafted; with mixed depths in one batch.
    steps = [ask("b0", len(short_prompts[0]) + 2, [42], 4),
             ask("b1", len(short_prompts[1]) - 2, short_prompts[1][-2:] + [11, 12], 6),
             ask("b2", len(short_prompts[2]) + 4, [batched[2].tokens[4]], 0),
             ask("b3", len(short_prompts[3]), [7], 1)]
    contexts = [short_prompts[0] + batched[0].tokens[:2] + [42], short_prompts[1] + [11, 12],
                short_prompts[2] + batched[2].tokens, short_prompts[3] + [7]]
    results = drafter.propose(steps)
    for step, context, result in zip(steps, contexts, results, strict=True):
        assert result.tokens == (fresh(drafter, context, step.depth).tokens if step.depth else [])
        assert result.cached_len == len(context) + max(step.depth - 1, 0)
    drafter.release([f"b{i}" for i in range(len(short_prompts))])


def test_mixed_batches_with_rollbacks_match_each_sequence_alone(drafter, smollm2_gguf: Path) -> None:
    """Random steps of a few sequences at once (new ones, rollbacks into what was drafted or further, prompts of up
    to 24 tokens): each sampled draft, q included, is exactly what the sequence's whole context gives alone."""
    rng = random.Random(0)
    alone = LlamaCppDrafter(smollm2_gguf, num_slots=1, max_seq_len=256, threads=THREADS)
    params = SamplingParams(temperature=1.0)
    held: dict[str, list[int]] = {}
    try:
        for step in range(6):
            asks, contexts = [], []
            for seq_id in rng.sample(["m0", "m1", "m2", "m3"], rng.randint(2, 4)):
                tokens = held.get(seq_id, [])
                rollback_to = rng.randint(max(0, len(tokens) - 6), len(tokens)) if tokens else 0
                new = [rng.randrange(100, 40000) for _ in range(rng.randint(1, 24 if rollback_to == 0 else 5))]
                asks.append(ask(seq_id, rollback_to, new, 3, params, seed=step))
                contexts.append(tokens[:rollback_to] + new)
            for a, context, result in zip(asks, contexts, drafter.propose(asks), strict=True):
                (reference,) = alone.propose([ask("alone", 0, context, 3, params, seed=step)])
                alone.release(["alone"])
                assert result.tokens == reference.tokens
                assert torch.equal(result.draft_top_k[0], reference.draft_top_k[0])
                assert torch.equal(result.draft_top_k[1], reference.draft_top_k[1])
                held[a.seq_id] = context + result.tokens[:-1]
    finally:
        drafter.release(list(held))
        alone.close()


def test_without_tree_slots_a_tree_request_gets_a_chain_within_its_shape(smollm2_gguf: Path, drafter, short_prompts
                                                                          ) -> None:
    """(Trees themselves: test_llamacpp_trees.py.)"""
    chain = fresh(drafter, short_prompts[0], 3).tokens
    chains_only = LlamaCppDrafter(smollm2_gguf, num_slots=1, max_seq_len=256, threads=THREADS, tree_slots=0)
    try:
        (result,) = chains_only.propose([ask("tree", 0, short_prompts[0], 8, tree=TreeShape("rsd-c", (2, 2, 1)))])
        assert result.tokens == chain and result.parents is None  # 3 levels
        (result,) = chains_only.propose([DraftRequest("tree", len(short_prompts[0]), [chain[0]], 8, GREEDY, 0,
                                                      TreeShape("rsd-s", beam_width=3, depth=8), max_nodes=2)])
        assert result.tokens == chain[1:3]  # the node budget
    finally:
        chains_only.close()


def test_sampled_drafts_carry_their_exact_q(drafter, short_prompts, reference) -> None:
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9)
    result = fresh(drafter, short_prompts[1], 4, params, seed=7)
    ids, probs = result.draft_top_k
    assert ids.shape == probs.shape == (4, drafter.num_pairs) and len(result.tokens) == 4
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=probs.dtype))
    assert ((probs > 0).sum(-1) <= 20).all()  # top-k 20
    for token, row_ids, row_probs in zip(result.tokens, ids, probs, strict=True):
        assert token in row_ids[row_probs > 0].tolist()
    # The first q is what the drafters' sampling makes of llama.cpp's own logits after the prompt.
    logits = torch.from_numpy(reference[tuple(short_prompts[1])][1])[None]
    expected = top_k_pairs(processed_probs(logits, torch.tensor([0.7]), torch.tensor([20]), torch.tensor([0.9])),
                           drafter.num_pairs)
    assert torch.equal(ids[0], expected[0][0]) and torch.allclose(probs[0], expected[1][0], atol=1e-5)

    again = fresh(drafter, short_prompts[1], 4, params, seed=7)
    assert again.tokens == result.tokens and torch.equal(again.draft_top_k[1], probs)


def test_unknown_sequences_release_and_lru_eviction(smollm2_gguf: Path, short_prompts) -> None:
    drafter = LlamaCppDrafter(smollm2_gguf, num_slots=2, max_seq_len=64, threads=THREADS)
    try:
        (unknown,) = drafter.propose([ask("never-seen", 5, [1], 2)])
        assert not unknown.known and unknown.cached_len == 0 and drafter.live_sequences == 0
        a, b = drafter.propose([ask("a", 0, short_prompts[0], 2), ask("b", 0, short_prompts[1], 2)])
        too_far, a_again = drafter.propose([ask("b", b.cached_len + 1, [1], 2), ask("a", a.cached_len, [3], 2)])
        assert not too_far.known and a_again.known
        assert drafter.cached_len("b") == b.cached_len  # an unknown answer changes nothing

        # "a" was used last: a new sequence takes "b"'s slot, and "b" is then unknown.
        (c,) = drafter.propose([ask("c", 0, short_prompts[2], 2)])
        assert c.tokens == fresh_tokens(smollm2_gguf, short_prompts[2], 2)
        assert drafter.live_sequences == 2 and drafter.cached_len("b") is None
        (b_gone,) = drafter.propose([ask("b", 3, [1], 2)])
        assert not b_gone.known

        with pytest.raises(ValueError, match="more than the drafter's 2 slots"):
            drafter.propose([ask(s, 0, [1, 2], 1) for s in ("x", "y", "z")])
        assert drafter.release(["a", "a", "b"]) == 1 and drafter.live_sequences == 1
        (a_gone,) = drafter.propose([ask("a", 2, [1], 1)])
        assert not a_gone.known
        (d,) = drafter.propose([ask("d", 0, short_prompts[3], 2)])  # the freed slot, with no eviction
        assert d.known and drafter.cached_len("c") is not None
    finally:
        drafter.close()


def test_long_first_batches_are_split_and_a_sequence_holds_up_to_max_seq_len(smollm2_gguf: Path,
                                                                              short_prompts) -> None:
    """Prompts longer together than a decode takes (max_seq_len tokens) go in several decodes; a sequence holds up
    to max_seq_len tokens (its drafts cut to fit), and a request for more is refused."""
    drafter = LlamaCppDrafter(smollm2_gguf, num_slots=3, max_seq_len=48, threads=THREADS)
    try:
        long = [(p * 20)[:30] for p in short_prompts[:3]]  # 90 tokens in all
        batched = drafter.propose([ask(f"l{i}", 0, p, 3) for i, p in enumerate(long)])
        assert [r.tokens for r in batched] == [fresh_tokens(smollm2_gguf, p, 3) for p in long]
        drafter.release([f"l{i}" for i in range(3)])

        (full,) = drafter.propose([ask("full", 0, long[0] + long[1][:17], 3)])  # 47 tokens: room for one fed draft
        assert full.tokens == fresh_tokens(smollm2_gguf, long[0] + long[1][:17], 2) and full.cached_len == 48
        with pytest.raises(ValueError, match="49 tokens exceed the cache's 48-token limit"):
            drafter.propose([ask("full", 48, [5], 1)])
    finally:
        drafter.close()


def fresh_tokens(gguf: Path, prompt: list[int], count: int) -> list[int]:
    return llama_cpp_greedy(gguf, prompt, count)[0]


def test_the_draft_service_reports_the_gguf_tokenizer_and_proposes(smollm2_dir: Path, short_prompts, reference) -> None:
    servicer = build_servicer(DraftConfig(drafter="llamacpp", model="smollm2-135m", num_slots=2, max_seq_len=256,
                                               threads=THREADS))
    assert servicer.drafter.live_sequences == 0  # the warm-up's scratch sequence is gone

    async def scenario() -> tuple[ReplicaInfo, list[int]]:
        server = grpc.aio.server()
        draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        link = GrpcDraftLink(f"127.0.0.1:{port}")
        try:
            info = await link.info(timeout_s=10)
            ask_six = DraftAsk(SessionDelta("s", 0, short_prompts[0]), DraftPlan(levels=6), GREEDY, 0)
            reply = await link.propose([ask_six], timeout_s=10)
            assert reply.cached_len["s"] == len(short_prompts[0]) + 5
            return info, list(reply.answers["s"].tokens)
        finally:
            await link.close()
            await server.stop(0)

    info, tokens = asyncio.run(scenario())
    assert tokens == reference[tuple(short_prompts[0])][0][:6]
    fingerprint = tokenizer_fingerprint(load_tokenizer(smollm2_dir))
    assert (info.kind, info.model, info.vocab_size, info.tokenizer_fingerprint) == (
        "llamacpp", "smollm2-135m", 49152, fingerprint)
    assert (info.max_seq_len, info.num_slots) == (256, 2)

    # The router takes it for a target with the same tokenizer, and refuses it for any other.
    target = ReplicaInfo("smollm2-135m", "target", 49152, fingerprint, max_seq_len=2048, num_slots=8)
    check_compatible([TargetReplica("10.0.0.1:50052", link=None, info=target)],
                     [DraftReplica("10.0.0.2:50051", link=None, info=info)])
    other = ReplicaInfo("qwen2.5-coder-0.5b", "target", 49152, "another tokenizer", max_seq_len=2048, num_slots=8)
    with pytest.raises(ValueError, match=r"llamacpp at 10\.0\.0\.2:50051 \(smollm2-135m, vocabulary 49152\) does not "
                                         r"share the tokenizer"):
        check_compatible([TargetReplica("10.0.0.1:50052", link=None, info=other)],
                         [DraftReplica("10.0.0.2:50051", link=None, info=info)])


def test_threads_default_to_the_cores_the_cgroup_quota_allows(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert available_cores(cpu_max) == cores  # no quota file
    cpu_max.write_text("max 100000\n")
    assert available_cores(cpu_max) == cores
    cpu_max.write_text("150000 100000\n")  # 1.5 cores: one thread, never more than the quota runs at once
    assert available_cores(cpu_max) == 1
    cpu_max.write_text(f"{100000 * (cores + 8)} 100000\n")
    assert available_cores(cpu_max) == cores


def test_without_llama_cpp_the_service_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` sees where it is not installed
    with pytest.raises(ValueError) as info:
        build_servicer(DraftConfig(drafter="llamacpp", model="/nowhere/model.gguf"))
    message = str(info.value)
    assert "--drafter llamacpp needs llama-cpp-python" in message and "pip install 'specfleet[llamacpp]'" in message
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF' in message


def test_a_vocabulary_other_than_the_targets_is_refused(smollm2_gguf: Path) -> None:
    with pytest.raises(ValueError, match=r"vocabulary \(49152 tokens\) differs from the target's \(151936\)"):
        LlamaCppDrafter(smollm2_gguf, num_slots=1, max_seq_len=32, threads=THREADS, target_vocab_size=151936)
