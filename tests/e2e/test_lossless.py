"""Through the real three-process deployment, greedy output equals plain greedy decoding of the target."""

from __future__ import annotations

import difflib
import textwrap
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import SPARSE_WINDOW
from prometheus_client.parser import text_string_to_metric_families

from specfleet.client import make_request, stream
from specfleet.launcher import free_port
from specfleet.models import load_tokenizer
from specfleet.policy import PREFILL_ROLE
from specfleet.speculation import PREFILL_TOKENS
from specfleet.telemetry import TelemetryReader

pytestmark = pytest.mark.real_model

MAX_NEW = 32
PROMPTS = [
    "Rename the variable x to count in this code:\ndef f(x):\n    x = x + 1\n    return x * x\n",
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "List three colors of the rainbow.",
    "Fix the typo in this sentence: 'The quick brwn fox jumps over the lazy dog.'",
    "Explain in one sentence why the sky is blue.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Translate 'good morning' into Spanish, French and German.",
]


@pytest.fixture(scope="module")
def prompt_ids(smollm2_dir: Path) -> list[list[int]]:
    tokenizer = load_tokenizer(smollm2_dir)
    # Mixed lengths: chat-rendered prompts and raw ones.
    out = []
    for i, prompt in enumerate(PROMPTS):
        if i % 2:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
            out.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            out.append(tokenizer.encode(prompt))
    return out


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Plain greedy decoding with transformers' generate."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            generated = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)
            outs.append(generated[0, len(ids):].tolist())
    return outs


def _generate_all(address: str, prompt_ids: list[list[int]]) -> list[list[int]]:
    """All prompts in flight at once, so every step batches them (mixed prompt lengths)."""
    def one(ids: list[int]) -> list[int]:
        messages = stream(address, make_request(ids, max_new_tokens=MAX_NEW), timeout_s=300)
        return [t for m in messages for t in m.token_ids]

    with ThreadPoolExecutor(len(prompt_ids)) as pool:
        return list(pool.map(one, prompt_ids))


@pytest.mark.parametrize("drafter", ["ngram", "tiny"])
@pytest.mark.parametrize("depth", [1, 4, 8, "auto"])
def test_greedy_equals_target_alone(cluster, drafter: str, depth: int | str, prompt_ids, reference) -> None:
    """Whatever the depth, fixed or chosen per step and per sequence by the policy, the tokens are the target's."""
    address = cluster.router(f"router-{drafter}-{depth}", target="target", draft=drafter, depth=depth)
    assert _generate_all(address, prompt_ids) == reference


def test_plain_decoding_depth_zero(cluster, prompt_ids, reference) -> None:
    address = cluster.router("router-plain", target="target", draft=None, depth=0)
    assert _generate_all(address, prompt_ids[:3]) == reference[:3]


def test_greedy_with_a_llamacpp_draft_equals_plain_decoding(cluster, llamacpp_draft, prompt_ids, reference) -> None:
    """SmolLM2's Q4_1 GGUF run by llama.cpp drafts for the float32 SmolLM2 target: quantization gets some of its
    drafts rejected, and changes no output token."""
    plain = _generate_all(cluster.router("router-plain", target="target", draft=None, depth=0), prompt_ids)
    address = cluster.router("router-llamacpp", target="target", draft=llamacpp_draft, depth=4)
    assert _generate_all(address, prompt_ids) == plain == reference


def test_greedy_with_a_sparse_self_draft_equals_plain_decoding(cluster, sparse_self_draft, prompt_ids, reference,
                                                                smollm2_dir) -> None:
    """The target's own weights over a sink + window cache draft for it: every prompt outgrows the window as it
    generates, so each sequence's draft attention slides (and drafts get rejected); two long ones are prefilled in
    chunks and outgrow the draft's storage, so their caches are trimmed while they generate. The tokens stay the
    target's."""
    long_ids = _long_prompts(smollm2_dir)
    assert sum(len(ids) > 4 + SPARSE_WINDOW for ids in [*prompt_ids, *long_ids]) >= 8  # sinks + window
    assert min(len(ids) for ids in prompt_ids) + MAX_NEW > 4 + SPARSE_WINDOW  # and all as they generate
    assert min(len(ids) for ids in long_ids) > 4 + SPARSE_WINDOW + 48 + 80  # sinks + window + reach + chunk
    plain = _generate_all(cluster.router("router-plain", target="target", draft=None, depth=0), long_ids)
    for depth in (4, "auto"):
        address = cluster.router(f"router-sparse-self-{depth}", target="target", draft=sparse_self_draft, depth=depth)
        assert _generate_all(address, [*prompt_ids, *long_ids]) == [*reference, *plain]


def _long_prompts(model_dir: Path) -> list[list[int]]:
    """Two pieces of Python's own standard library, about 300 tokens each, to continue."""
    tokenizer = load_tokenizer(model_dir)
    texts = [Path(module.__file__).read_text()[:1200] for module in (textwrap, difflib)]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def test_greedy_with_two_draft_pools_equals_plain_decoding(cluster, sparse_self_draft, prompt_ids,
                                                          reference) -> None:
    """An n-gram pool and a sparse_self pool behind one router: each sequence drafts from the pool the policy
    chooses for it, step by step, switching between them (each pool keeps its own session of it); the tokens stay
    the target's."""
    for depth in ("auto", 3):
        address = cluster.router(f"router-two-pools-{depth}", target="target", draft=None, depth=depth,
                                 pools=["ngram", sparse_self_draft])
        assert _generate_all(address, prompt_ids) == reference
    reasons = _reasons(address, prompt_ids[:2])
    assert all(reason.startswith("pinned drafters ") for reason in reasons), reasons


def _reasons(address: str, prompts: list[list[int]]) -> list[str]:
    """The depth reason each request's last stream message carries."""
    return [list(stream(address, make_request(ids, max_new_tokens=8), timeout_s=300))[-1].stats.depth_reason
            for ids in prompts]


def _drafts_ahead(metrics_port: int) -> dict[str, float]:
    """specfleet_drafts_ahead_total by outcome, from the router's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return {sample.labels["outcome"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "specfleet_drafts_ahead_total"}


@pytest.mark.parametrize(("drafter", "depth"), [("ngram", 2), ("ngram", "auto"), ("tiny", 2), ("llamacpp", 3),
                                                ("llamacpp", "auto"), ("sparse_self", 3)])
def test_greedy_equals_target_alone_when_drafting_ahead(cluster, drafter: str, depth: int | str, prompt_ids,
                                                         reference, request) -> None:
    """Drafts made ahead while the target verifies are used when they came true and dropped when not: either way
    the tokens are the target's."""
    if drafter in ("llamacpp", "sparse_self"):
        request.getfixturevalue(f"{drafter}_draft")
    metrics_port = free_port()
    address = cluster.router(f"router-ahead-{drafter}-{depth}", target="target", draft=drafter, depth=depth,
                             extra=["--draft-ahead", "--metrics-port", str(metrics_port)])
    assert _generate_all(address, prompt_ids) == reference
    if depth != "auto" and drafter != "tiny":  # these drafts come true often on these prompts, and not always
        outcomes = _drafts_ahead(metrics_port)
        assert outcomes["used"] > 0 and outcomes["dropped"] > 0, outcomes


@pytest.mark.parametrize(("drafter", "extra"), [("tiny", []), ("llamacpp", ["--draft-ahead"])])
def test_greedy_equals_target_alone_with_prompts_computed_alongside(cluster, drafter: str, extra: list[str],
                                                                     prompt_ids, reference, request) -> None:
    """Each drafter computes a prompt while the target does, and the sequence drafts from its next step on: the
    tokens are the target's."""
    if drafter == "llamacpp":
        request.getfixturevalue("llamacpp_draft")
    address = cluster.router(f"router-alongside-{drafter}", target="target", draft=drafter, depth=3,
                             extra=["--prefill-alongside", *extra])
    assert _generate_all(address, prompt_ids) == reference


def test_a_llamacpp_draft_reports_what_computing_prompts_costs_it(cluster, llamacpp_draft, prompt_ids,
                                                                   reference) -> None:
    """The draft service writes what computing prompts costs it to Redis, where `auto` prices each sequence's
    catch-up from it (`specfleet.policy.catch_up`); the tokens stay the target's whichever sequences start drafting."""
    for name in ("router-catch-up-1", "router-catch-up-2"):  # the second starts with the first's samples in Redis
        address = cluster.router(name, target="target", draft="llamacpp", depth="auto")
        assert _generate_all(address, prompt_ids) == reference
    reader = TelemetryReader(cluster.redis_url)
    try:
        view = reader.read()
    finally:
        reader.close()
    assert view is not None
    prompts = [s for s in view.samples if s.role == PREFILL_ROLE and s.drafter == "llamacpp"]
    assert prompts and all(s.ms > 0 and s.tokens_per_seq > PREFILL_TOKENS for s in prompts)


SPACE_MASK_TOKEN = 16  # SmolLM2's <empty_output>: chat never uses it, and any token keeps the output the model's
# The self-drafting targets live for one test each, beside the shared cluster: small caches, plain weights only.
SELF_DRAFTING_SLOTS = ["--num-slots", "8", "--max-seq-len", "512", "--cpu-prepack", "off"]


def _self_drafting_target_decodes_plainly(cluster, smollm2_dir, prompt_ids, reference, name: str, flags: list[str],
                                          depths: tuple[int | str, ...]) -> None:
    """A target started with ``flags`` drafts for itself: routers with --self-draft at each of ``depths`` give the
    plain reference, and at the first (fixed) depth its candidates are drafted and some accepted."""
    cluster.start(f"{name}-target", "target", ["--model", str(smollm2_dir), *SELF_DRAFTING_SLOTS, "--redis-url",
                                               cluster.redis_url, *flags])
    try:
        for depth in depths:
            address = cluster.router(f"router-{name}-{depth}", target=f"{name}-target", draft=None, depth=depth,
                                     extra=["--self-draft"])
            assert _generate_all(address, prompt_ids) == reference, depth
        pinned = cluster.addresses[f"router-{name}-{depths[0]}"]
        stats = [list(stream(pinned, make_request(ids, max_new_tokens=MAX_NEW), timeout_s=300))[-1].stats
                 for ids in prompt_ids[:4]]
        assert sum(s.drafted_tokens for s in stats) > 0 and sum(s.accepted_tokens for s in stats) > 0, stats
    finally:
        cluster.stop(*(f"router-{name}-{depth}" for depth in depths), f"{name}-target")


def test_greedy_with_a_self_drafting_space_target_equals_plain_decoding(cluster, smollm2_dir, prompt_ids,
                                                                         reference) -> None:
    """A target that drafts for itself: each Verify also proposes the next step's candidates from mask tokens in the
    same pass. SmolLM2 was never fine-tuned for masks, so most candidates are rejected: the output must not depend
    on what the masks learned, whatever the number of masks, fixed or chosen per step (auto may well decode plainly
    with an untrained model's masks)."""
    _self_drafting_target_decodes_plainly(cluster, smollm2_dir, prompt_ids, reference, "space",
                                          ["--space-masks", "6", "--space-mask-token", str(SPACE_MASK_TOKEN)],
                                          (3, 1, 6, "auto"))


def test_greedy_with_a_lookahead_target_equals_plain_decoding(cluster, smollm2_dir, prompt_ids, reference) -> None:
    """Lookahead on the unmodified model: each Verify runs a Jacobi chain beside the candidates its n-gram pool
    proposed. The tokens are the model's, and candidates from the pool do get accepted."""
    _self_drafting_target_decodes_plainly(cluster, smollm2_dir, prompt_ids, reference, "lookahead",
                                          ["--lookahead-window", "6", "--lookahead-ngram", "4"], (3, "auto"))


def test_greedy_with_a_prompt_lookup_target_equals_plain_decoding(cluster, smollm2_dir, prompt_ids, reference) -> None:
    """The target drafts for itself by prompt lookup in each sequence's text, after every verdict: no draft
    service. The tokens are the model's, at a fixed depth and at depths the policy chooses, and drafts get accepted."""
    _self_drafting_target_decodes_plainly(cluster, smollm2_dir, prompt_ids, reference, "lookup",
                                          ["--prompt-lookup-depth", "6"], (4, "auto"))


def test_greedy_through_a_llamacpp_target_is_llama_cpps_own_decoding(cluster, smollm2_gguf, prompt_ids) -> None:
    """A target that runs SmolLM2's Q4_1 GGUF on llama.cpp (`--backend llamacpp`): plain decoding, ngram drafts at
    depths the policy chooses, a router asking for trees of a model draft (which then drafts chains for this
    target) and the target's own prompt lookup (`--self-draft`) all give what llama.cpp gives decoding the GGUF
    alone, one token at a time."""
    from llama_cpp_reference import llama_cpp_greedy

    expected = [llama_cpp_greedy(smollm2_gguf, ids, MAX_NEW, stop=True)[0] for ids in prompt_ids]
    cluster.start("llamacpp-target", "target", ["--backend", "llamacpp", "--model", "smollm2-135m", "--threads", "1",
                                                "--num-slots", "8", "--max-seq-len", "512",
                                                "--redis-url", cluster.redis_url, "--prompt-lookup-depth", "4"])
    routers = {"plain": (None, 0, []), "ngram-auto": ("ngram", "auto", []), "tree": ("tiny", 3, ["--tree", "rsd-c"]),
               "prompt-lookup": (None, 4, ["--self-draft"])}
    try:
        for name, (draft, depth, extra) in routers.items():
            address = cluster.router(f"router-on-llamacpp-{name}", target="llamacpp-target", draft=draft,
                                     depth=depth, extra=extra)
            assert _generate_all(address, prompt_ids) == expected, name
    finally:
        cluster.stop(*(f"router-on-llamacpp-{name}" for name in routers), "llamacpp-target")
