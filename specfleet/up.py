"""``specfleet up``: a whole deployment on this machine, one process per part."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from specfleet.config import (
    DraftConfig,
    EngineConfig,
    RouterConfig,
    ServiceConfig,
    TargetConfig,
    option,
    same_as,
    to_arguments,
)
from specfleet.launcher import Deployment, free_port, wait_redis, wait_serving

log = logging.getLogger("specfleet.up")

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")  # what redis-py's from_url accepts
MODEL_DRAFTERS = ("model", "llamacpp")  # the drafters that run a model: --draft-model, else the target's --model
SELF_DRAFTER = "sparse_self"  # drafts with the target's own --model


@dataclass(frozen=True)
class Services:
    """The configurations ``up`` starts the services with."""

    target: TargetConfig
    draft: DraftConfig | None  # none when the target drafts for itself (--self-draft)
    router: RouterConfig

    def by_role(self) -> dict[str, ServiceConfig]:
        """By role, in the order they start: the router needs the others serving."""
        parts: dict[str, ServiceConfig | None] = {"target": self.target, "draft": self.draft, "router": self.router}
        return {role: config for role, config in parts.items() if config is not None}


@dataclass(frozen=True)
class UpConfig:
    """``specfleet up``'s flags: its own, then the services' flags it passes on.

    A flag marked ``[target]``, ``[draft]``, ``[router]`` is that service's field declared again with `same_as`:
    its default, help and choices are the service's, and `services` hands the value on unchanged, so
    ``specfleet up`` with no flags runs each service at exactly its own defaults.
    """

    prompt: str = option("", "answer this one prompt (as a user chat message) through the router, print the answer, "
                         "then stop everything (empty: keep running until Ctrl-C)")
    max_new_tokens: int = option(64, "with --prompt: the most tokens to generate")
    model: str = same_as(TargetConfig, "model", to="target")
    backend: str = same_as(TargetConfig, "backend", to="target")
    drafter: str = same_as(DraftConfig, "drafter", to="draft")
    draft_model: str = option("", "with --drafter model or llamacpp: the draft's model, sharing the target's "
                              "tokenizer (llamacpp: a preset or a .gguf file; empty: the target's --model)")
    device: str = same_as(EngineConfig, "device", to="target, draft")
    dtype: str = same_as(EngineConfig, "dtype", to="target, draft")
    num_slots: int = same_as(EngineConfig, "num_slots", to="target, draft")
    max_seq_len: int = same_as(EngineConfig, "max_seq_len", to="target, draft")
    threads: int = same_as(EngineConfig, "threads", to="target, draft")  # they take turns: see `threads_note`
    depth: str = same_as(RouterConfig, "depth", to="router")
    max_depth: int = same_as(RouterConfig, "max_depth", to="router")
    tree: str = same_as(RouterConfig, "tree", to="router")
    self_draft: bool = same_as(RouterConfig, "self_draft", to="router")  # and then no draft service starts
    draft_ahead: bool = same_as(RouterConfig, "draft_ahead", to="router")
    prefill_alongside: bool = same_as(RouterConfig, "prefill_alongside", to="router")
    port: int = option(RouterConfig.port, "the router's port; the draft service listens on the next port and the "
                       "target on the one after (on a free port instead where another process holds that one)")
    http_port: int = option(8000, "[router] port of the OpenAI-compatible HTTP API on 127.0.0.1 (0: none; the router "
                            "alone serves none unless given --http-port)")
    redis_url: str = option("", "use this running Redis for fleet telemetry, e.g. redis://127.0.0.1:6379/0 "
                            "(empty: start a redis-server on a free port)")
    log_dir: str = option("", "write each process's log to <dir>/<name>.log instead of this terminal")
    log_level: str = same_as(ServiceConfig, "log_level", to="every process")

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535 - 2:
            raise ValueError(f"--port must be in [1, 65533] (the draft and target take the next two ports), "
                             f"got {self.port}")
        if self.http_port and self.http_port in self.ports.values():
            raise ValueError(f"--http-port {self.http_port} is one of the gRPC ports {sorted(self.ports.values())} "
                             "(--port and the next two)")
        if self.redis_url and not self.redis_url.startswith(REDIS_SCHEMES):
            raise ValueError(f"--redis-url must start with {', '.join(REDIS_SCHEMES)}, got {self.redis_url!r}")
        if self.draft_model and self.drafter not in MODEL_DRAFTERS:
            raise ValueError(f"--draft-model is for --drafter model or llamacpp (the {self.drafter} drafter "
                             + ("drafts with the target's own --model)" if self.drafter == SELF_DRAFTER else
                                "has no model)"))
        router = self.services(self.redis_url, {}).router  # runs each service's own checks, before anything starts
        if not 1 <= self.max_new_tokens <= router.max_new_tokens_cap:
            raise ValueError(f"--max-new-tokens must be in [1, {router.max_new_tokens_cap}] (the router's cap), "
                             f"got {self.max_new_tokens}")

    @property
    def ports(self) -> dict[str, int]:
        return {"router": self.port, "draft": self.port + 1, "target": self.port + 2}

    def services(self, redis_url: str, metrics_ports: Mapping[str, int], ports: Mapping[str, int] | None = None
                 ) -> Services:
        """Each service's configuration: this deployment's values, the rest the service's defaults.

        ``redis_url`` is the Redis they share (the one ``up`` started unless --redis-url); ``metrics_ports`` gives
        a role its /metrics port (absent: none); ``ports`` each role's gRPC port (None: `ports`).
        """
        ports = self.ports if ports is None else ports
        metrics = {role: metrics_ports.get(role, 0) for role in ("target", "draft", "router")}
        # An ngram draft has no model: it keeps the default, so its argv does not name one.
        draft_model = (self.draft_model or self.model) if self.drafter in MODEL_DRAFTERS else (
            self.model if self.drafter == SELF_DRAFTER else DraftConfig.model)
        return Services(
            target=TargetConfig(port=ports["target"], metrics_port=metrics["target"], redis_url=redis_url,
                                log_level=self.log_level, model=self.model, backend=self.backend, device=self.device,
                                dtype=self.dtype, num_slots=self.num_slots, max_seq_len=self.max_seq_len,
                                threads=self.threads),
            draft=None if self.self_draft else DraftConfig(
                port=ports["draft"], metrics_port=metrics["draft"], redis_url=redis_url, log_level=self.log_level,
                model=draft_model, device=self.device, dtype=self.dtype, num_slots=self.num_slots,
                max_seq_len=self.max_seq_len, threads=self.threads, drafter=self.drafter),
            router=RouterConfig(port=ports["router"], metrics_port=metrics["router"], redis_url=redis_url,
                                log_level=self.log_level, targets=f"127.0.0.1:{ports['target']}",
                                drafts="" if self.self_draft else f"127.0.0.1:{ports['draft']}", depth=self.depth,
                                max_depth=self.max_depth, tree=self.tree, http_port=self.http_port,
                                self_draft=self.self_draft, draft_ahead=self.draft_ahead,
                                prefill_alongside=self.prefill_alongside),
        )

    def argvs(self, redis_url: str, metrics_ports: Mapping[str, int], ports: Mapping[str, int] | None = None
              ) -> dict[str, list[str]]:
        """The flags each service is started with: those of `services` that differ from its defaults, and its port."""
        return {role: to_arguments(config, always=("port",))
                for role, config in self.services(redis_url, metrics_ports, ports).by_role().items()}


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port`` now (as gRPC binds: reusing an address in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def listening_ports(config: UpConfig) -> dict[str, int]:
    """The gRPC port of each role: --port and the next two, except that the draft and the target, which only the
    router calls, move to a free port where another process holds theirs. The router's port and the HTTP port are
    the ones a user connects to: ValueError, saying so, if another process holds either."""
    ports = dict(config.ports)
    public = {"--port": config.port, **({"--http-port": config.http_port} if config.http_port else {})}
    for flag, port in public.items():
        if not port_is_free(port):
            raise ValueError(f"port {port} ({flag}) is in use by another process: choose another with {flag}")
    for role in ("draft", "target"):
        if not port_is_free(ports[role]):
            ports[role] = free_port()
            log.info("port %d is in use by another process: the %s listens on %d", config.ports[role], role,
                     ports[role])
    return ports


def up(config: UpConfig) -> int:
    """Starts the deployment ``config`` describes, waits until every part serves, then answers --prompt and stops,
    or runs until Ctrl-C, SIGTERM or a process exiting. Returns the exit code."""
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ports = listening_ports(config)
    except ValueError as err:
        print(f"specfleet up: {err}", file=sys.stderr)
        return 1
    metrics_ports = {role: free_port() for role in ("target", "draft", "router")}  # one /metrics per process
    deployment = Deployment(Path(config.log_dir) if config.log_dir else None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        redis_url = config.redis_url
        if not redis_url:
            redis_port = free_port()
            wait_redis(deployment.start_redis(redis_port), redis_port)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        services = config.services(redis_url, metrics_ports, ports)
        argvs = config.argvs(redis_url, metrics_ports, ports)
        target = deployment.start_service("target", argvs["target"])
        draft = deployment.start_service("draft", argvs["draft"]) if services.draft is not None else None
        log.info("waiting for the %s (the first run converts the model once)",
                 "draft and target services" if draft is not None else "target service")
        wait_serving(target, f"127.0.0.1:{services.target.port}")
        if draft is not None and services.draft is not None:
            wait_serving(draft, f"127.0.0.1:{services.draft.port}")
        router = deployment.start_service("router", argvs["router"])
        router_address = f"127.0.0.1:{services.router.port}"
        wait_serving(router, router_address)
        print(f"\n{summary(services, redis_url)}", flush=True)
        log.info("%s", threads_note(services))
        if config.prompt:
            from specfleet.client import make_request, print_stream

            print(f"\n> {config.prompt}\n", flush=True)
            print_stream(router_address, make_request(chat=[{"role": "user", "content": config.prompt}],
                                                      max_new_tokens=config.max_new_tokens))
            return 0
        print(f'try:  specfleet generate --router {router_address} --chat "Write a haiku about GPUs"\n'
              "Ctrl-C stops everything.", flush=True)
        while not stop.wait(0.5):
            for process in deployment.processes:
                if process.popen.poll() is not None:
                    log.error("%s exited with code %d; stopping", process.name, process.popen.returncode)
                    return 1
        return 0
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError) as err:
        print(f"specfleet up: {err}", file=sys.stderr)
        return 1
    finally:
        log.info("stopping all processes")
        deployment.stop(timeout_s=30.0, in_order=True)


def threads_note(services: Services) -> str:
    """How the machine's cores are shared, for the log: the router drafts, then verifies, so the draft and the target
    compute one after the other and each may use every core; drafting ahead, they compute at once, so each should
    get its own cores (--threads caps both alike); the router itself needs little CPU."""
    def threads(config: EngineConfig) -> str:
        return f"{config.threads} threads" if config.threads else "every core"

    target = f"target ({services.target.backend}): {threads(services.target)}"
    draft = services.draft
    if draft is None or draft.drafter == "ngram":
        return f"{target}; the router and {'the ngram draft' if draft else 'nothing else'} need little CPU"
    if services.router.draft_ahead:
        return (f"{target}; draft ({draft.drafter}): {threads(draft)}; drafting ahead, they compute at the same time, "
                "so they contend for the cores they share: drafting ahead pays where each has cores of its own (a "
                "CPU draft beside a GPU target, or cores split between them)")
    return (f"{target}; draft ({draft.drafter}): {threads(draft)}; they compute in turn (the router asks the draft, "
            "then the target), so each may use every core (--threads to cap both)")


def summary(services: Services, redis_url: str) -> str:
    """What is up and where: the lines printed once every part serves."""
    target, draft, router = services.target, services.draft, services.router
    if draft is None:
        drafts = "drafts by the target itself"
    else:
        drafter = f"{draft.drafter} {draft.model}" if draft.drafter in (*MODEL_DRAFTERS, SELF_DRAFTER) else \
            draft.drafter
        drafts = f"draft {drafter} on {draft.port}"
    scrape = ", ".join(f"{role} http://127.0.0.1:{config.metrics_port}/metrics"
                       for role, config in services.by_role().items() if config.metrics_port)
    http = f"\nOpenAI API: http://127.0.0.1:{router.http_port}/v1 (model {target.model!r})" if router.http_port else ""
    return (f"specfleet is up: router on 127.0.0.1:{router.port} ({drafts}, "
            f"target {target.model} on {target.port}, Redis {redis_url})\nmetrics: {scrape}{http}")
