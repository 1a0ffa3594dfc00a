"""Typed, validated configuration: one dataclass per service, and the CLI built from it.

Each field's ``metadata["help"]`` is its documentation and its ``--help`` line; ``__post_init__``
checks values so a bad flag fails at start-up with a message that names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from specfleet.models import DEFAULT_MODEL
from specfleet.policy import DRAFT_HURDLE
from specfleet.space_model import NEW_MASK_TOKEN
from specfleet.trees.shapes import TREE_METHODS, TreeShape, parse_branching

TARGET_BACKENDS = ("engine", "llamacpp")  # what runs a target's model (target_service.server)
DRAFTER_KINDS = ("ngram", "model", "llamacpp", "sparse_self")  # the drafters a draft service runs (specfleet.drafters)
ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # the engine's weight dtypes (specfleet.engine.runner)
TEXT_LOSSES = ("distill", "next-token")  # train-space's losses at the text's positions (specfleet.training.sar)
MAX_DEPTH = 16  # the most draft tokens per sequence per step anywhere in the fleet


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def same_as(config_cls: type, name: str, to: str) -> Any:
    """``config_cls``'s field ``name`` declared again, for a command that passes it on (``specfleet up``).

    The default, help and argparse settings (choices ...) are the field's own, so the two flags cannot drift apart;
    the help starts with ``[to]``, who receives the value.
    """
    source = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    return field(default=source.default, metadata={**source.metadata, "help": f"[{to}] {source.metadata['help']}"})


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ServiceConfig:
    """What every service has: where it listens and where telemetry goes."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 in a container)")
    port: int = option(0, "gRPC port")
    metrics_port: int = option(0, "port for Prometheus to scrape /metrics on --host (0: no endpoint; the chart uses "
                               "9464). Traces and OTLP metrics follow the standard OTEL_* environment variables")
    redis_url: str = option("", "Redis for fleet telemetry, e.g. redis://127.0.0.1:6379/0 (empty: none)")
    telemetry_prefix: str = option("specfleet", "prefix of every Redis key this fleet uses")
    log_level: str = option("INFO", "logging level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    drain_timeout_s: float = option(60.0, "on SIGTERM or SIGINT, health goes NOT_SERVING at once, new calls are "
                                    "refused, and calls under way (a router's streams included) get this long to "
                                    "finish")
    internal_token_file: str = option("", "file holding internal tokens, one per line: a router sends its one "
                                      "token; a draft or target answers only callers that send one of its tokens, "
                                      "and keeps each token's sequences apart from the others' (else the "
                                      "SPECFLEET_INTERNAL_TOKEN environment variable, one per line; neither: no "
                                      "token)")

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, f"--port must be in [0, 65535], got {self.port}")
        _check(0 <= self.metrics_port < 65536, f"--metrics-port must be in [0, 65535], got {self.metrics_port}")
        _check(self.metrics_port == 0 or self.metrics_port != self.port, "--metrics-port must differ from --port")
        _check(self.drain_timeout_s >= 0, f"--drain-timeout-s must be >= 0, got {self.drain_timeout_s}")


@dataclass(frozen=True)
class EngineConfig(ServiceConfig):
    """A service that runs a model on the slot KV cache."""

    model: str = option(DEFAULT_MODEL, "model: a preset name (smollm2-135m, qwen2.5-coder-0.5b, "
                        "qwen2.5-coder-1.5b), a local Hugging Face model folder, or a hub id (org/name) already in "
                        "the local Hugging Face cache")
    device: str = option("auto", "torch device: cpu, cuda, cuda:1 ... (auto: cuda when present)")
    dtype: str = option("auto", "dtype of the weights, activations and KV cache (auto: bfloat16 on CUDA, float32 "
                        "elsewhere)", choices=list(ENGINE_DTYPES))
    num_slots: int = option(32, "sequences held in the KV cache at once (least recently used are evicted)")
    max_seq_len: int = option(2048, "longest sequence (prompt + generation) in tokens, capped by the model")
    cpu_prepack: str = option("on", "on CPU, also keep the linear weights in oneDNN's packed layout and time both "
                              "kernels at load: forwards of a few tokens get cheaper (verification, small "
                              "batches), weight memory doubles (off: plain weights only)",
                              choices=["on", "off"])
    prefix_reuse: str = option("on", "a sequence sent whole starts from the longest prefix of it the KV cache holds "
                               "(a live sequence's, or a finished one's whose slot is not yet taken again): a chat's "
                               "next turn computes only its new tokens (off: every prompt computed in full). The "
                               "sparse_self drafter's streaming cache continues a finished sequence only from about "
                               "where it ended (as a chat's next turn does); the llamacpp backend never reuses",
                               choices=["on", "off"])
    threads: int = option(0, "CPU threads the model computes with: torch's intra-op threads for the engine, "
                          "llama.cpp's for a llamacpp drafter or target (0: torch's default; llama.cpp: the cores "
                          "this process may use, within its cgroup's CPU quota). Give fewer where other busy "
                          "processes share the cores: threads that wait for each other at every layer stall when one "
                          "is descheduled")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.threads >= 0, f"--threads must be >= 0, got {self.threads}")
        _check(self.num_slots >= 1, f"--num-slots must be >= 1, got {self.num_slots}")
        _check(self.max_seq_len >= 16, f"--max-seq-len must be >= 16, got {self.max_seq_len}")
        _check(self.dtype in ENGINE_DTYPES, f"--dtype must be one of {', '.join(ENGINE_DTYPES)}, got {self.dtype!r}")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class TargetConfig(EngineConfig):
    """The target service: verifies drafts with the big model."""

    port: int = option(50052, "gRPC port")
    backend: str = option("engine", "what runs the model: engine (specfleet's PyTorch engine on --device, draft "
                          "chains and trees, SPACE and lookahead self-drafting) or llamacpp (the model's quantized "
                          "GGUF as it is packaged, run by llama.cpp on the CPU with --threads: a preset or a .gguf "
                          "file as --model; draft chains only, and prompt-lookup self-drafting; lossless with "
                          "respect to llama.cpp's own decoding of that GGUF; needs specfleet[llamacpp])",
                          choices=list(TARGET_BACKENDS))
    space_masks: int = option(-1, "SPACE self-drafting: the most mask tokens a sequence's step may append after its "
                              "last token and after each candidate, to draft its next step in the same pass (-1: as "
                              "the model folder's specfleet_space.json says, off for an ordinary model; 0: off)")
    space_mask_token: int = option(-1, "SPACE self-drafting: the token id mask positions hold (-1: the model folder's, "
                                   "from `specfleet train-space`); any id works for output, only a fine-tuned model "
                                   "drafts well")
    lookahead_window: int = option(0, "lookahead self-drafting, for a model without a fine-tune: each pass also runs "
                                   "a Jacobi chain of this many guesses after every sequence, whose outputs fill an "
                                   "n-gram pool the next drafts come from (0: off)")
    lookahead_ngram: int = option(4, "lookahead self-drafting: n-gram size (a step drafts at most n - 1 tokens)")
    prompt_lookup_depth: int = option(0, "prompt-lookup self-drafting, for any model and either backend: after each "
                                      "verify the target looks the sequence's last tokens up in its own text and "
                                      "proposes up to this many of the tokens that followed them, as the ngram draft "
                                      "service would, without a draft service's round trip per step (0: off)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.lookahead_window <= 64, f"--lookahead-window must be in [0, 64], got {self.lookahead_window}")
        _check(2 <= self.lookahead_ngram <= MAX_DEPTH + 1,
               f"--lookahead-ngram must be in [2, {MAX_DEPTH + 1}], got {self.lookahead_ngram}")
        _check(0 <= self.prompt_lookup_depth <= MAX_DEPTH,
               f"--prompt-lookup-depth must be in [0, {MAX_DEPTH}], got {self.prompt_lookup_depth}")
        _check(not (self.prompt_lookup_depth and self.lookahead_window),
               "--prompt-lookup-depth and --lookahead-window are two ways of self-drafting: choose one")
        _check(self.backend in TARGET_BACKENDS,
               f"--backend must be one of {', '.join(TARGET_BACKENDS)}, got {self.backend!r}")
        _check(self.backend == "engine" or (self.space_masks <= 0 and not self.lookahead_window),
               "--space-masks and --lookahead-window draft with the engine backend's tree attention: the llamacpp "
               "backend verifies draft chains only")
        _check(self.space_masks >= -1, f"--space-masks must be >= -1, got {self.space_masks}")
        _check(self.space_masks <= MAX_DEPTH,
               f"--space-masks must be <= {MAX_DEPTH} (a step's drafts), got {self.space_masks}")


@dataclass(frozen=True)
class DraftConfig(EngineConfig):
    """The draft service: proposes draft tokens."""

    port: int = option(50051, "gRPC port")
    drafter: str = option("ngram", "how to draft: ngram (prompt lookup, no model), model (a small LM sharing the "
                          "target's tokenizer, given by --model) or llamacpp (a quantized GGUF model sharing the "
                          "target's tokenizer, run by llama.cpp on the CPU; --model is a preset or a .gguf file; needs "
                          "specfleet[llamacpp]) or sparse_self (the target's own --model, each token attending only to "
                          "the first --sparse-sinks tokens and the last --sparse-window: a draft whose cost does not "
                          "grow with the context, for long prompts)", choices=list(DRAFTER_KINDS))
    top_k_pairs: int = option(64, "draft distribution sent per token as its top-K (token, prob) pairs")
    ngram_max: int = option(3, "ngram drafter: longest suffix to look up")
    ngram_min: int = option(2, "ngram drafter: shortest suffix to look up (a 1-token match drafts wrong more often "
                            "than right on open-ended text)")
    sparse_sinks: int = option(16, "sparse_self drafter: the first tokens every draft token attends to (attention "
                               "sinks)")
    sparse_window: int = option(240, "sparse_self drafter: the most recent tokens every draft token attends to")
    tree_slots: int = option(8, "llamacpp drafter: spare KV-cache slots (of --max-seq-len tokens each) that the "
                             "branches of draft trees (a router's --tree) grow on, each a copy of its sequence's "
                             "cache; a wider tree is drafted as a chain; 0: every tree as a chain")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.tree_slots >= 0, f"--tree-slots must be >= 0, got {self.tree_slots}")
        _check(self.top_k_pairs >= 1, f"--top-k-pairs must be >= 1, got {self.top_k_pairs}")
        _check(1 <= self.ngram_min <= self.ngram_max, "need 1 <= --ngram-min <= --ngram-max")
        _check(self.sparse_sinks >= 0, f"--sparse-sinks must be >= 0, got {self.sparse_sinks}")
        _check(self.sparse_window >= 1, f"--sparse-window must be >= 1, got {self.sparse_window}")


@dataclass(frozen=True)
class TrainSpaceConfig:
    """Fine-tune a model for SPACE self-drafting."""

    model: str = option("smollm2-135m", "the model to fine-tune: a preset name or a local Hugging Face folder")
    out: str = option("", "output folder: the fine-tuned model, its data and checkpoints (a rerun resumes there)")
    masks: int = option(4, "mask tokens per group: the most candidates a step can draft (the target's --space-masks)")
    mask_token: str = option("", "the mask token: an id or a token of the vocabulary that chat never uses (empty: a "
                             f"new token {NEW_MASK_TOKEN} added to the vocabulary)")
    groups: int = option(12, "mask groups per training text, each at a random position of the answer")
    examples: int = option(1500, "ShareGPT prompts answered by the model to train on")
    answer_tokens: int = option(128, "tokens the model answers each prompt with (greedy)")
    answer_batch: int = option(32, "prompts answered at once")
    batch_size: int = option(4, "texts per training step")
    learning_rate: float = option(1e-4, "AdamW learning rate (constant after a short warm-up)")
    mask_loss_weight: float = option(1.0, "weight of the loss at mask positions beside the text's loss")
    text_loss: str = option("distill", "the loss at the text's own positions, which keeps the model what it was: "
                            "distill (KL divergence from the original model's next-token distribution, at every text "
                            "position) or next-token (cross-entropy on the answers' tokens: cheaper, but training on "
                            "the model's own greedy answers sharpens it, and its perplexity on other text rises)",
                            choices=list(TEXT_LOSSES))
    max_steps: int = option(0, "training steps in all, over every run into --out (0: until the time budget ends)")
    time_budget_min: float = option(60.0, "minutes this run may take, answering prompts included; then it saves a "
                                    "checkpoint and exports what it has (0: no limit, needs --max-steps)")
    save_steps: int = option(25, "steps between checkpoints")
    snapshot_steps: int = option(50, "steps between snapshots of the weights alone under snapshots/step-N, from step "
                                 "0: the learning curve `python -m bench.space` measures (0: none)")
    device: str = option("auto", "torch device: cpu or cuda (auto: cuda when present)")
    seed: int = option(0, "seed of the data order and the mask positions")
    log_level: str = option("INFO", "logging level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    def __post_init__(self) -> None:
        _check(bool(self.out), "--out is required: the folder the fine-tuned model goes to")
        _check(1 <= self.masks <= 16, f"--masks must be in [1, 16], got {self.masks}")
        _check(self.groups >= 1, f"--groups must be >= 1, got {self.groups}")
        _check(self.examples >= 1 and self.answer_tokens >= 4, "need --examples >= 1 and --answer-tokens >= 4")
        _check(self.batch_size >= 1 and self.answer_batch >= 1, "--batch-size and --answer-batch must be >= 1")
        _check(self.max_steps >= 0 and self.time_budget_min >= 0, "--max-steps and --time-budget-min must be >= 0")
        _check(self.max_steps > 0 or self.time_budget_min > 0, "give --max-steps or --time-budget-min (or both)")
        _check(self.save_steps >= 1, f"--save-steps must be >= 1, got {self.save_steps}")
        _check(self.snapshot_steps >= 0, f"--snapshot-steps must be >= 0, got {self.snapshot_steps}")
        _check(self.text_loss in TEXT_LOSSES, f"--text-loss must be one of {TEXT_LOSSES}, got {self.text_loss!r}")


SERVICE_SCHEME = "k8s://"
# A DNS-1035 label (Service names) or DNS-1123 label (namespaces, port names): what Kubernetes accepts.
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_SERVICE_POOL = re.compile(rf"(?P<service>{_LABEL})(\.(?P<namespace>{_LABEL}))?:(?P<port>[0-9]{{1,5}}|{_LABEL})")
POOL_SYNTAX = ("host:port,host:port,... or k8s://<service>[.<namespace>]:<port> (a Kubernetes Service: its ready "
               "endpoints, followed as they come and go; <port> is the Service port's name or the pods' port "
               "number; the namespace defaults to the router's own)")


@dataclass(frozen=True)
class StaticPool:
    """Replicas at fixed addresses."""

    addresses: tuple[str, ...]

    def __str__(self) -> str:
        return ",".join(self.addresses)


@dataclass(frozen=True)
class ServicePool:
    """The ready endpoints of a Kubernetes Service. ``namespace`` empty: the router's own."""

    service: str
    namespace: str
    port: str  # a port name, or the pods' port number as digits

    def __str__(self) -> str:
        namespace = f".{self.namespace}" if self.namespace else ""
        return f"{SERVICE_SCHEME}{self.service}{namespace}:{self.port}"


Pool = StaticPool | ServicePool


def parse_pool(text: str, flag: str) -> Pool:
    """``--targets``/``--drafts`` as a pool; raises ValueError naming ``flag`` when it is malformed."""
    text = text.strip()
    if text.startswith(SERVICE_SCHEME):
        match = _SERVICE_POOL.fullmatch(text[len(SERVICE_SCHEME):])
        _check(match is not None, f"{flag} {text!r}: expected {SERVICE_SCHEME}<service>[.<namespace>]:<port>")
        assert match is not None
        port = match["port"]
        _check(not port.isdigit() or 0 < int(port) < 65536, f"{flag} {text!r}: port must be in [1, 65535]")
        return ServicePool(match["service"], match["namespace"] or "", port)
    addresses = tuple(a.strip() for a in text.split(",") if a.strip())
    for address in addresses:
        _check(SERVICE_SCHEME not in address, f"{flag}: a k8s:// pool cannot be mixed with other addresses")
        host, _, port = address.rpartition(":")
        _check(bool(host) and port.isdigit(), f"{flag}: {address!r} is not host:port")
    return StaticPool(addresses)


DEFAULT_DRAFT_POOL = "draft-pool"
"""The name of the one draft pool a router is given without names (``--drafts host:port``)."""
_POOL_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")
DRAFT_POOLS_SYNTAX = ("one pool as for --targets, or several of different kinds as name=POOL entries, e.g. "
                      "ngram=127.0.0.1:50051,sparse_self=127.0.0.1:50053 (entries sharing a name form one pool; "
                      "the depth policy then chooses each sequence's pool every step)")


def parse_draft_pools(text: str, flag: str = "--drafts") -> dict[str, Pool]:
    """``--drafts`` as named pools: ``host:port,...`` (or one ``k8s://`` pool) is one pool, `DEFAULT_DRAFT_POOL`;
    ``name=POOL,name=POOL,...`` several, in the order first named; empty: none. Raises ValueError naming ``flag``."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        return {}
    named = ["=" in e for e in entries]
    if not any(named):
        return {DEFAULT_DRAFT_POOL: parse_pool(text, flag)}
    _check(all(named), f"{flag} {text!r}: name every pool (name=host:port) or none")
    groups: dict[str, list[str]] = {}
    for entry in entries:
        name, _, pool = entry.partition("=")
        name = name.strip()
        _check(_POOL_NAME.fullmatch(name) is not None, f"{flag}: pool name {name!r} must be a lowercase letter "
               "followed by up to 39 lowercase letters, digits, '-' or '_'")
        _check(bool(pool.strip()), f"{flag}: pool {name!r} has no address")
        groups.setdefault(name, []).append(pool.strip())
    return {name: parse_pool(",".join(pools), f"{flag} {name}") for name, pools in groups.items()}


@dataclass(frozen=True)
class RouterConfig(ServiceConfig):
    """The router: the public gRPC front door and the speculation loop."""

    port: int = option(50050, "public gRPC port")
    http_port: int = option(0, "port of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                            "/v1/models, /health) on --host, e.g. 8000 (0: no HTTP API)")
    served_model_name: str = option("", "the model name the OpenAI API serves and requests must name (empty: the "
                                    "target's --model)")
    api_key_file: str = option("", "file of API keys, one per line: clients of the public APIs must send one "
                               "(HTTP: Authorization: Bearer <key>; gRPC: the same authorization metadata); the "
                               "SPECFLEET_API_KEYS environment variable adds comma-separated keys (neither: no key "
                               "needed)")
    admin_key_file: str = option("", "file of admin keys, one per line (SPECFLEET_ADMIN_KEYS adds comma-separated "
                                 "ones): API keys that may also abort anyone's request and see the internal "
                                 "addresses in GetServerInfo; without any API key every caller may")
    tls_cert: str = option("", "PEM certificate: serve the public gRPC and HTTP ports over TLS (with --tls-key)")
    tls_key: str = option("", "PEM private key of --tls-cert")
    targets: str = option("127.0.0.1:50052", f"target services: {POOL_SYNTAX}")
    drafts: str = option("127.0.0.1:50051", f"draft services: {DRAFT_POOLS_SYNTAX} (empty: no speculation)")
    depth: str = option("auto", "draft tokens per step: auto (chosen each step, per sequence, from live "
                        "telemetry) or a fixed K (0: plain decoding through the target)")
    max_depth: int = option(8, "largest depth the policy may choose (at most 16)")
    tree: str = option("none", "draft trees instead of chains: none, rsd-c (Gumbel-Top-k with --tree-branching "
                       "children per level), rsd-s (stochastic beam search keeping --beam-width sequences per "
                       "level), iid (independent sampling with replacement in rsd-c's shape, a baseline) or duo "
                       "(DuoDecoding: up to --tree-branching's first number of sequences with distinct first "
                       "tokens, as many as the draft is unsure of, each a chain); an ngram drafter merges several "
                       "prompt-lookup matches whatever the method",
                       choices=["none", *TREE_METHODS])
    tree_branching: str = option("2,2,1", "rsd-c: children per node at each level, e.g. 2,2,1 (its length caps "
                                 "the levels)")
    beam_width: int = option(3, "rsd-s: sequences kept per level")
    max_tree_nodes: int = option(16, "most tree nodes per sequence per step; with --depth auto the policy picks "
                                 "a budget up to this each step (wider trees at small batch, chains or nothing "
                                 "at large batch)")
    policy_mode: str = option("throughput", "auto depth objective: throughput (maximise generated tokens/s) or "
                              "latency (minimise time per output token, above --min-goodput)",
                              choices=["throughput", "latency"])
    min_goodput: float = option(0.0, "latency mode: the throughput floor in tokens/s the policy must keep")
    min_draft_gain: float = option(DRAFT_HURDLE, "auto depth drafts only when it predicts at least this gain over "
                                   "plain decoding (0.1 is 10 percent); smaller predicted gains are within the cost "
                                   "model's error (0: always the predicted optimum)")
    calibration_half_life: int = option(100, "auto depth: the drafting hurdle scales each plan's predicted gain by "
                                        "how far this router's recent drafting steps beat their predictions, "
                                        "relative to its plain steps, per batch size; about this many steps "
                                        "count, and after this many plain steps in a row it is forgotten and "
                                        "measured again (0: take the predictions as they are)")
    policy_refresh_s: float = option(1.0, "how often the cost model is refitted from Redis telemetry")
    default_max_new_tokens: int = option(128, "max_new_tokens when a request does not say")
    max_new_tokens_cap: int = option(4096, "largest max_new_tokens a request may ask for")
    max_queue: int = option(1024, "requests waiting for a slot before new ones get RESOURCE_EXHAUSTED")
    max_prompt_bytes: int = option(1 << 20, "largest prompt in UTF-8 bytes (the text, or the chat messages' contents "
                                   "together), refused with INVALID_ARGUMENT before it is tokenised. 1 MiB is "
                                   "about 256K tokens of English: more than any preset's context holds (32K "
                                   "tokens at most), so only prompts that could never fit are refused unread; "
                                   "raise it for targets with a longer context")
    max_stop_strings: int = option(16, "most stop strings a request may give (OpenAI's 4 is too few for chat "
                                   "templates' several end markers); each one is searched in every step's text")
    max_stop_length: int = option(256, "longest stop string in characters: stop strings are markers, and text "
                                  "that might still grow into one is held back from the stream")
    draft_timeout_ms: float = option(2000.0, "a Propose slower than this is dropped: the step runs at depth 0 "
                                     "(scaled up for a Propose that prefills a long prompt)")
    verify_timeout_ms: float = option(60000.0, "a Verify slower than this counts as its target failing: the "
                                      "target's sequences move to another target (a call prefilling prompts gets "
                                      "this once per 4096 tokens it carries)")
    draft_retry_s: float = option(2.0, "after a draft failure, skip that draft replica for this long")
    draft_ahead: bool = option(False, "draft the next step while the target verifies this one (DuoDecoding): "
                               "each sequence's drafter continues its drafts as if all were accepted, and those "
                               "drafts are used when they came true; drafting then costs no wall time when it "
                               "fits inside the verify, as a CPU drafter beside a GPU target does")
    prefill_alongside: bool = option(False, "a sequence's first step does not wait for a drafter with a KV cache "
                                     "to compute its prompt: the drafter computes it while the target does, and the "
                                     "sequence drafts from its next step on (DuoDecoding's time to first token); "
                                     "pays where the drafter has compute of its own, as a CPU draft beside a GPU "
                                     "target")
    self_draft: bool = option(False, "the target drafts for itself (a SPACE model, see `specfleet target "
                              "--space-masks`): each Verify also proposes the sequence's next drafts from mask "
                              "tokens in the same forward pass, and no draft service is called (--drafts is not used)")
    tokenizer: str = option("", "model spec to take the tokenizer from (default: the target's model)")
    target_wait_s: float = option(60.0, "while no target is up (none ready in a k8s:// pool, or every one failed), "
                                  "requests wait this long for one (within their deadline) before failing with "
                                  "UNAVAILABLE")
    canary_share: float = option(0.0, "share of finished greedy requests generated again by plain decoding, in the "
                                 "background while the targets have room, to check that speculation changed no "
                                 "token (specfleet_canary_mismatches_total); 0: off")
    max_moves: int = option(3, "times a request may move to another target after its target failed or left "
                            "(each move re-prefills it there) before it fails with UNAVAILABLE")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.tls_cert) == bool(self.tls_key), "--tls-cert and --tls-key go together")
        _check(0 <= self.http_port < 65536, f"--http-port must be in [0, 65535], got {self.http_port}")
        _check(self.http_port == 0 or self.http_port not in (self.port, self.metrics_port),
               "--http-port must differ from --port and --metrics-port")
        _check(1 <= self.max_depth <= MAX_DEPTH, f"--max-depth must be in [1, {MAX_DEPTH}], got {self.max_depth}")
        _check(self.depth == "auto" or (self.depth.isdigit() and int(self.depth) <= self.max_depth),
               f"--depth must be auto or an integer in [0, {self.max_depth}] (--max-depth), got {self.depth!r}")
        _check(self.min_goodput >= 0, f"--min-goodput must be >= 0, got {self.min_goodput}")
        _check(self.min_draft_gain >= 0, f"--min-draft-gain must be >= 0, got {self.min_draft_gain}")
        _check(self.calibration_half_life >= 0,
               f"--calibration-half-life must be >= 0, got {self.calibration_half_life}")
        _check(self.beam_width >= 1, f"--beam-width must be >= 1, got {self.beam_width}")
        _check(1 <= self.max_tree_nodes <= 64, f"--max-tree-nodes must be in [1, 64], got {self.max_tree_nodes}")
        try:
            parse_branching(self.tree_branching)
        except ValueError as err:
            raise ValueError(f"--tree-branching: {err}") from None
        _check(not (self.draft_ahead and self.tree != "none"), "--draft-ahead drafts chains ahead: it does not "
               "combine with --tree")
        _check(not (self.self_draft and (self.draft_ahead or self.tree != "none")), "--self-draft verifies chains "
               "the target drafted in its last pass: it does not combine with --draft-ahead or --tree")
        _check(not (self.self_draft and self.prefill_alongside), "--prefill-alongside lets draft services compute "
               "prompts while the target does: with --self-draft no draft service is called")
        _check(self.policy_refresh_s > 0, f"--policy-refresh-s must be > 0, got {self.policy_refresh_s}")
        target_pool = parse_pool(self.targets, "--targets")  # raises on a malformed pool
        _check(not isinstance(target_pool, StaticPool) or bool(target_pool.addresses),
               "--targets needs at least one host:port or a k8s:// Service")
        pools = parse_draft_pools(self.drafts)
        _check(len(pools) < 2 or self.tree == "none", f"--tree {self.tree} drafts one tree shape for the whole "
               "batch: it takes one draft pool, not several")
        _check(self.target_wait_s > 0, f"--target-wait-s must be > 0, got {self.target_wait_s}")
        _check(self.max_moves >= 0, f"--max-moves must be >= 0, got {self.max_moves}")
        _check(0 <= self.canary_share <= 1, f"--canary-share must be in [0, 1], got {self.canary_share}")
        _check(1 <= self.default_max_new_tokens <= self.max_new_tokens_cap,
               "need 1 <= --default-max-new-tokens <= --max-new-tokens-cap")
        _check(self.draft_timeout_ms > 0 and self.verify_timeout_ms > 0, "timeouts must be > 0")
        _check(self.max_prompt_bytes >= 1, f"--max-prompt-bytes must be >= 1, got {self.max_prompt_bytes}")
        _check(self.max_stop_strings >= 0, f"--max-stop-strings must be >= 0, got {self.max_stop_strings}")
        _check(self.max_stop_length >= 1, f"--max-stop-length must be >= 1, got {self.max_stop_length}")

    @property
    def pinned_depth(self) -> int | None:
        """The fixed depth, or None when the policy chooses (--depth auto)."""
        return None if self.depth == "auto" else int(self.depth)

    @property
    def tree_shape(self) -> TreeShape | None:
        """The configured tree shape at its fullest (None: chains). RSD-S and duo get --max-depth levels."""
        if self.tree in ("rsd-c", "iid"):
            return TreeShape(self.tree, parse_branching(self.tree_branching))
        if self.tree == "duo":
            return TreeShape("duo", (parse_branching(self.tree_branching)[0], *([1] * (self.max_depth - 1))))
        if self.tree == "rsd-s":
            return TreeShape("rsd-s", beam_width=self.beam_width, depth=self.max_depth)
        return None

    @property
    def speculates(self) -> bool:
        return self.pinned_depth != 0 and (self.self_draft or any(isinstance(pool, ServicePool) or bool(pool.addresses)
                                                                  for pool in self.draft_pools.values()))

    @property
    def target_pool(self) -> Pool:
        return parse_pool(self.targets, "--targets")

    @property
    def draft_pools(self) -> dict[str, Pool]:
        """The draft pools by name (`parse_draft_pools`); none when the target drafts for itself."""
        return {} if self.self_draft else parse_draft_pools(self.drafts)

    @property
    def speculation_pools(self) -> list[str]:
        """The names of the draft pools the router drafts from, in --drafts order; none without speculation."""
        return list(self.draft_pools) if self.speculates else []

    @property
    def draft_pool(self) -> Pool:
        """The draft pool of a router given one; ValueError for several (see `draft_pools`)."""
        pools = self.draft_pools
        _check(len(pools) == 1, f"--drafts names {len(pools)} pools ({', '.join(pools) or 'none'}), not one")
        return next(iter(pools.values()))


def add_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Adds one ``--flag`` per dataclass field, with its help text and default."""
    for f in dataclasses.fields(config_cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):  # --flag / --no-flag
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        parser.add_argument(flag, type=type(f.default), default=f.default, help=help_text, **meta)


def from_arguments(config_cls: type, args: argparse.Namespace) -> Any:
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def to_arguments(config: Any, always: Iterable[str] = ()) -> list[str]:
    """The argv that `add_arguments`' parser and `from_arguments` turn back into ``config``.

    One ``--flag=value`` for each field that differs from its default, and for each field named in ``always``
    (the ``=`` form keeps a value that starts with ``-`` from reading as a flag). Fields hold str, int or float,
    whose ``str`` parses back to the same value, or bool (``--flag`` or ``--no-flag``).
    """
    names = {f.name for f in dataclasses.fields(config)}
    named = set(always)
    if not named <= names:
        raise ValueError(f"{type(config).__name__} has no field {', '.join(sorted(named - names))}")
    def argument(name: str, value: Any) -> str:
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            return f"--{flag}" if value else f"--no-{flag}"
        return f"--{flag}={value}"

    return [argument(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.name in named or getattr(config, f.name) != f.default]

