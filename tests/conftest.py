"""Shared fixtures: the real SmolLM2 (converted once per machine), tiny models, and real deployments."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from specfleet.launcher import Deployment, free_port, wait_redis, wait_serving


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_model: uses the real SmolLM2-135M weights (converted once, cached)")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from specfleet.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_draft_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer: a `model` drafter that is fast and usually wrong."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from specfleet.models import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-draft")
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_tokenizer(smollm2_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a 97-token vocabulary, for drafter and tree tests that need no real tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-model")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


class Cluster:
    """Real services in their own processes; routers are cheap, so tests add one per setting."""

    def __init__(self, deployment: Deployment, redis_url: str) -> None:
        self.deployment = deployment
        self.redis_url = redis_url
        self.addresses: dict[str, str] = {}
        self.target_args: list[str] = []  # the shared target's arguments, for a test that needs a variant of it

    def start(self, name: str, role: str, args: list[str]) -> str:
        port = free_port()
        process = self.deployment.start_service(role, [*args, "--port", str(port)], name=name)
        address = f"127.0.0.1:{port}"
        wait_serving(process, address, timeout_s=600)
        self.addresses[name] = address
        return address

    def router(self, name: str, *, target: str, draft: str | None, depth: int | str, extra: list[str] = (),
               redis_url: str | None = None, pools: list[str] = ()) -> str:
        """A router on the session's Redis (or ``redis_url``), started on first use; ``pools``: several draft
        pools instead of ``draft``, each named after its draft service (``--drafts name=address,...``)."""
        if name not in self.addresses:
            drafts = (",".join(f"{pool}={self.addresses[pool]}" for pool in pools) if pools
                      else self.addresses[draft] if draft else "")
            self.start(name, "router", ["--targets", self.addresses[target], "--drafts", drafts, "--depth", str(depth),
                                        "--redis-url", redis_url or self.redis_url, *extra])
        return self.addresses[name]

    def process(self, name: str):
        return next(p for p in self.deployment.processes if p.name == name)

    def stop(self, *names: str) -> None:
        """Stops services started for one test (their memory goes back to the tests after it)."""
        for name in names:
            if name in self.addresses:
                process = self.process(name)
                process.popen.terminate()
                process.popen.wait(timeout=60)
                del self.addresses[name]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, tiny_draft_dir: Path) -> Iterator[Cluster]:
    """Redis, one SmolLM2 target, an ngram draft and a tiny-model draft, shared by the end-to-end tests."""
    log_dir = tmp_path_factory.mktemp("logs")
    with Deployment(log_dir) as deployment:
        redis_port = free_port()
        wait_redis(deployment.start_redis(redis_port), redis_port)
        cluster = Cluster(deployment, f"redis://127.0.0.1:{redis_port}/0")
        slots = ["--num-slots", "24", "--max-seq-len", "1024", "--redis-url", cluster.redis_url]
        cluster.target_args = ["--model", str(smollm2_dir), *slots]
        cluster.start("target", "target", cluster.target_args)
        cluster.start("ngram", "draft", ["--drafter", "ngram", "--redis-url", cluster.redis_url])
        cluster.start("tiny", "draft", ["--drafter", "model", "--model", str(tiny_draft_dir), *slots])
        yield cluster


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M's Q4_1 GGUF as its preset packages it (what llama.cpp runs)."""
    from specfleet.models import resolve_gguf

    return resolve_gguf("smollm2-135m")


@pytest.fixture(scope="session")
def short_prompts(smollm2_dir: Path) -> list[list[int]]:
    """`llama_cpp_reference.SHORT_TEXTS` in SmolLM2's tokens: what the llama.cpp tests decode."""
    from llama_cpp_reference import SHORT_TEXTS

    from specfleet.models import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    return [tokenizer.encode(text) for text in SHORT_TEXTS]


@pytest.fixture(scope="session")
def llamacpp_draft(cluster: Cluster) -> str:
    """SmolLM2's Q4_1 GGUF run by llama.cpp as a draft service in the shared cluster; its name there."""
    if "llamacpp" not in cluster.addresses:
        # One llama.cpp thread: the target and the router share this machine's cores, and llama.cpp's threads stall
        # at every layer while another process holds one of theirs.
        cluster.start("llamacpp", "draft", ["--drafter", "llamacpp", "--model", "smollm2-135m", "--threads", "1",
                                            "--num-slots", "24", "--max-seq-len", "1024",
                                            "--redis-url", cluster.redis_url])
    return "llamacpp"


SPARSE_WINDOW = 8
"""The sparse_self draft's window in the end-to-end tests: shorter than most test prompts, so it slides."""


@pytest.fixture(scope="session")
def sparse_self_draft(cluster: Cluster, smollm2_dir: Path) -> str:
    """A sparse_self draft over the target's own SmolLM2 weights (4 sinks, a `SPARSE_WINDOW`-token window) in the
    shared cluster; its name there."""
    if "sparse_self" not in cluster.addresses:
        window = ["--sparse-sinks", "4", "--sparse-window", str(SPARSE_WINDOW)]
        cluster.start("sparse_self", "draft", ["--drafter", "sparse_self", "--model", str(smollm2_dir), *window,
                                               "--num-slots", "24", "--max-seq-len", "1024",
                                               "--redis-url", cluster.redis_url])
    return "sparse_self"
