"""The llamacpp target backend on the real SmolLM2-135M GGUF (Q4_1): the Verifier over `LlamaCppRunner` decodes
exactly as llama.cpp does one token at a time (greedy), over llama.cpp's own logits (sampled), with sessions,
rollbacks and eviction; the target service says it verifies chains only and refuses trees by name."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from llama_cpp_reference import llama_cpp_greedy

from router.replicas import ReplicaError, ReplicaInfo
from router.target_link import GrpcTargetLink
from specfleet.config import TargetConfig
from specfleet.engine import Extend
from specfleet.llamacpp import PROBE_WIDTHS, LlamaCppRunner
from specfleet.models import eos_token_ids, load_tokenizer, tokenizer_fingerprint
from specfleet.protos import target_pb2_grpc
from specfleet.sampling_params import SamplingParams
from specfleet.speculation import Proposal, SessionDelta, VerifyAsk
from target_service.self_drafting import PromptLookupDrafting
from target_service.server import build_servicer
from target_service.verifier import Verifier, VerifyItem

pytestmark = pytest.mark.real_model

GREEDY = SamplingParams()
THREADS = 1  # one llama.cpp thread: on a busy machine its threads wait for each other at every layer
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def runner(smollm2_gguf: Path) -> Iterator[LlamaCppRunner]:
    runner = LlamaCppRunner(smollm2_gguf, num_slots=4, max_seq_len=256, threads=THREADS, batch_invariant=True)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def reference(smollm2_gguf: Path, short_prompts: list[list[int]]) -> list[tuple[list[int], np.ndarray]]:
    """llama.cpp's own greedy decoding of each prompt, one token per decode, and its logits at each step."""
    return [llama_cpp_greedy(smollm2_gguf, p, NEW_TOKENS) for p in short_prompts]


def speculate(verifier: Verifier, short_prompts: list[list[int]], drafts_for, count: int) -> list[list[int]]:
    """A router's loop in miniature: every sequence in each batch, each step's new tokens the last step's output,
    ``drafts_for(index, context)`` its drafts; stops once every sequence has ``count`` tokens."""
    outputs: list[list[int]] = [[] for _ in short_prompts]
    cached = [0] * len(short_prompts)
    while min(len(o) for o in outputs) < count:
        items = []
        for n, prompt in enumerate(short_prompts):
            context = prompt + outputs[n]
            items.append(VerifyItem(f"s{n}", cached[n], context[cached[n]:], drafts_for(n, context), None, GREEDY))
        for n, verdict in enumerate(verifier.verify(items)):
            assert verdict.known
            outputs[n] += verdict.tokens
            cached[n] = verdict.cached_len
            assert verdict.cached_len == len(short_prompts[n]) + len(outputs[n]) - 1  # all but the newest token
    verifier.release([f"s{n}" for n in range(len(short_prompts))])
    return [o[:count] for o in outputs]


def test_greedy_verification_decodes_as_llama_cpp_does_one_token_at_a_time(runner, short_prompts, reference) -> None:
    """Four sequences batched, drafts of 0 to 6 tokens that are right for a while and then wrong: the output is
    llama.cpp's own greedy decoding, token for token."""
    rng = random.Random(0)
    truth = [tokens for tokens, _ in reference]

    def drafts_for(n: int, context: list[int]) -> list[int]:
        done = len(context) - len(short_prompts[n])
        right = truth[n][done:done + rng.randint(0, 6)]
        return right[: rng.randint(0, len(right))] + [rng.randrange(runner.vocab_size)] * rng.randint(0, 2)

    assert speculate(Verifier(runner), short_prompts, drafts_for, NEW_TOKENS) == truth
    assert runner.live_sequences == 0


def test_prompt_lookup_in_the_target_decodes_as_llama_cpp_does(runner, short_prompts, reference) -> None:
    """The target drafts for itself by prompt lookup (`--prompt-lookup-depth`): each verdict brings the candidates
    the next step verifies, and the output is still llama.cpp's own greedy decoding."""
    verifier = Verifier(runner, PromptLookupDrafting(4, max_ngram=3, min_ngram=1))
    outputs: list[list[int]] = [[] for _ in short_prompts]
    cached = [0] * len(short_prompts)
    candidates: list[tuple[int, ...]] = [()] * len(short_prompts)
    drafted = 0
    while min(len(o) for o in outputs) < NEW_TOKENS:
        items = [VerifyItem(f"s{n}", cached[n], (prompt + outputs[n])[cached[n]:], list(candidates[n]), None, GREEDY,
                            draft_next=4) for n, prompt in enumerate(short_prompts)]
        for n, verdict in enumerate(verifier.verify(items)):
            outputs[n] += verdict.tokens
            cached[n] = verdict.cached_len
            candidates[n] = verdict.next_tokens
            drafted += len(verdict.next_tokens)
    verifier.release([f"s{n}" for n in range(len(short_prompts))])
    assert [o[:NEW_TOKENS] for o in outputs] == [tokens for tokens, _ in reference]
    assert drafted > 0 and runner.live_sequences == 0 and not verifier.drafting.texts


def test_batched_chains_get_exactly_the_logits_of_one_token_decoding(runner, short_prompts, reference) -> None:
    """Four prompts, each with 20 tokens of its continuation, in one extend (over a hundred tokens, wider than the
    micro-batch): at every position each sequence gets bit for bit the logits llama.cpp computes feeding it one token
    at a time (what greedy and sampled verification decide from)."""
    assert runner.micro_batch in (*PROBE_WIDTHS, 1)
    logits = runner.extend([Extend(f"chain{n}", 0, prompt + tokens[:20], num_logits=21)
                            for n, (prompt, (tokens, _)) in enumerate(zip(short_prompts, reference, strict=True))])
    runner.release([f"chain{n}" for n in range(len(short_prompts))])
    for rows, (_, expected) in zip(logits, reference, strict=True):
        assert rows.shape == (21, runner.vocab_size)
        np.testing.assert_array_equal(rows.numpy(), expected[:21])


def test_sessions_roll_back_resend_and_evict(runner, short_prompts, reference) -> None:
    verifier = Verifier(runner)
    (first,) = verifier.verify([VerifyItem("a", 0, short_prompts[0], [], None, GREEDY)])
    assert first.tokens == (reference[0][0][0],) and first.cached_len == len(short_prompts[0])
    # Rolled back into its prompt: the next token is that of the shorter context.
    short = short_prompts[0][:-1]
    (back,) = verifier.verify([VerifyItem("a", len(short) - 1, short[-1:], [], None, GREEDY)])
    assert back.tokens == (llama_cpp_greedy(runner.gguf, short, 1)[0][0],) and back.cached_len == len(short)
    # Asking past what it holds, or for a sequence it never saw, gets "unknown" (the router resends).
    assert not verifier.verify([VerifyItem("a", len(short_prompts[0]) + 5, [7], [], None, GREEDY)])[0].known
    assert not verifier.verify([VerifyItem("never", 3, [7], [], None, GREEDY)])[0].known
    # Four slots: a fifth sequence evicts the least recently used one.
    for name in ("b", "c", "d", "e"):
        verifier.verify([VerifyItem(name, 0, short_prompts[1], [], None, GREEDY)])
    assert runner.cached_len("a") is None and runner.live_sequences == 4
    assert verifier.release(["b", "c", "d", "e", "a"]) == 4


def test_trees_and_self_drafting_are_refused_by_name(runner, short_prompts) -> None:
    verifier = Verifier(runner)
    with pytest.raises(ValueError, match="llamacpp backend verifies draft chains, not trees"):
        verifier.verify([VerifyItem("t", 0, short_prompts[0], [5, 6], None, GREEDY, draft_parents=[-1, -1])])
    with pytest.raises(ValueError, match="not started with a SPACE model, lookahead or prompt lookup"):
        verifier.verify([VerifyItem("t", 0, short_prompts[0], [], None, GREEDY, draft_next=2)])
    for flags in ({"space_masks": 2}, {"lookahead_window": 4}):
        with pytest.raises(ValueError, match="llamacpp backend verifies draft chains only"):
            TargetConfig(backend="llamacpp", **flags)


def test_the_target_service_serves_the_gguf_and_says_it_verifies_chains(smollm2_dir, short_prompts, reference) -> None:
    servicer = build_servicer(TargetConfig(backend="llamacpp", model="smollm2-135m", num_slots=2, max_seq_len=256,
                                           threads=THREADS))
    assert servicer.verifier.runner.live_sequences == 0  # the warm-up's scratch sequence is gone
    truth = reference[0][0]

    async def scenario() -> tuple[ReplicaInfo, tuple[int, ...], str]:
        server = grpc.aio.server()
        target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        link = GrpcTargetLink(f"127.0.0.1:{port}")
        try:
            info = await link.info(timeout_s=10)
            ask = VerifyAsk(SessionDelta("s", 0, short_prompts[0]), Proposal(tuple(truth[:3]) + (0,)), GREEDY, 0)
            reply = await link.verify([ask], timeout_s=10)
            tree = VerifyAsk(SessionDelta("t", 0, short_prompts[1]), Proposal((5, 6), parents=(-1, -1)), GREEDY, 0)
            with pytest.raises(ReplicaError) as refused:
                await link.verify([tree], timeout_s=10)
            return info, reply.answers["s"].tokens, str(refused.value)
        finally:
            await link.close()
            await server.stop(0)

    info, tokens, refusal = asyncio.run(scenario())
    assert tokens == tuple(truth[:4])  # three drafts accepted, the fourth corrected
    assert refusal.startswith("INVALID_ARGUMENT") and "not trees" in refusal
    tokenizer = load_tokenizer(smollm2_dir)
    # What the engine's target says of the same model, so routers and drafts take one for the other.
    assert (info.kind, info.vocab_size, info.tokenizer_fingerprint, info.chains_only) == (
        "target", 49152, tokenizer_fingerprint(tokenizer), True)
    assert set(info.eos_token_ids) >= set(eos_token_ids(smollm2_dir, tokenizer))
    assert (info.max_seq_len, info.num_slots) == (256, 2)
    # Where it computes, for a router drafting ahead: this machine, and on the CPU the cores it may run on.
    assert (info.host, info.cpus) == (socket.gethostname(), tuple(sorted(os.sched_getaffinity(0))))


def test_without_llama_cpp_the_target_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` sees where it is not installed
    with pytest.raises(ValueError, match=r"--backend llamacpp needs llama-cpp-python, which is not installed: "
                                         r"install it with CMAKE_ARGS="):
        build_servicer(TargetConfig(backend="llamacpp", model="/nowhere/model.gguf"))
