"""The router's metrics under vLLM's names, for the tools built on them.

KEDA recipes, the Gateway API Inference Extension's endpoint picker, and community dashboards read
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``, ``vllm:time_to_first_token_seconds`` and the like, each
with a ``model_name`` label. The router serves them on its Prometheus endpoint beside its own ``specfleet_*`` names,
measured at the same points. OpenTelemetry does not allow ``:`` in an instrument's name, so these are
`prometheus_client` metrics in the service's registry: Prometheus scrapes them, OTLP does not carry them (OTLP
carries the ``specfleet_*`` names).

How they read here, where a router serves many target replicas:

    vllm:num_requests_running / _waiting     requests in the router's step loops / waiting for a target slot
    vllm:kv_cache_usage_perc                 the fraction of its targets' sequence slots that its requests hold
                                             (0-1, as vLLM's; a slot is one sequence's KV cache)
    vllm:prompt_tokens_total, vllm:generation_tokens_total
    vllm:request_success_total{finished_reason}   stop, length, abort or error
    vllm:request_prompt_tokens, vllm:request_generation_tokens   per finished request (histograms)
    vllm:time_to_first_token_seconds         admission to the first token sent
    vllm:inter_token_latency_seconds         per sequence per step that sent it tokens: the time since its last ones
                                             (a step sends several tokens when drafts are accepted)
    vllm:request_time_per_output_token_seconds   per request: (last token - first token) / (tokens - 1)
    vllm:e2e_request_latency_seconds, vllm:request_queue_time_seconds
    vllm:spec_decode_num_drafts_total        sequence-steps that verified draft tokens
    vllm:spec_decode_num_draft_tokens_total, vllm:spec_decode_num_accepted_tokens_total
    vllm:spec_decode_num_accepted_tokens_per_pos_total{position}
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from specfleet.stats import StepStats

# Latencies from 1 ms; a whole request (or its wait for a slot) may take many minutes.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_COUNT_BUCKETS = tuple(float(m * 10 ** e) for e in range(6) for m in (1, 2, 5))  # 1, 2, 5, 10 ... 500000
FINISHED_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "aborted": "abort"}


class VllmMetrics:
    """vLLM-named series for one served model; with no registry (no /metrics endpoint) every call does nothing."""

    def __init__(self, registry: CollectorRegistry | None = None, model_name: str = "") -> None:
        self.enabled = registry is not None
        if registry is None:
            return
        label = {"model_name": model_name}

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["model_name"], registry=registry).labels(**label)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model_name"], registry=registry, buckets=buckets).labels(**label)

        self._running = Gauge("vllm:num_requests_running", "Requests in the router's step loops.", ["model_name"],
                              registry=registry).labels(**label)
        self._waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a target slot.", ["model_name"],
                              registry=registry).labels(**label)
        self._slot_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of the targets' sequence slots in use by this "
                                 "router's requests (1: all).", ["model_name"], registry=registry).labels(**label)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of the requests admitted.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self._success = Counter("vllm:request_success", "Finished requests by finished_reason.",
                                ["model_name", "finished_reason"], registry=registry)
        self._model_name = model_name
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per finished request.",
                                               TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Generated tokens per finished request.", TOKEN_COUNT_BUCKETS)
        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds",
                                             "From admission to the first token sent.", LATENCY_BUCKETS)
        self.inter_token_latency = histogram("vllm:inter_token_latency_seconds",
                                             "Time between a sequence's successive steps that sent it tokens.",
                                             LATENCY_BUCKETS)
        self.time_per_output_token = histogram("vllm:request_time_per_output_token_seconds",
                                               "Per request: (last token - first token) / (tokens - 1).",
                                               LATENCY_BUCKETS)
        self.e2e_latency = histogram("vllm:e2e_request_latency_seconds", "From admission to the request's end.",
                                     LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "From admission to a place in a step loop.",
                                    LATENCY_BUCKETS)
        self.num_drafts = counter("vllm:spec_decode_num_drafts", "Sequence-steps that verified draft tokens.")
        self.num_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.num_accepted_tokens = counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self._accepted_per_position = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                              "Draft tokens accepted at each position (0: the first).",
                                              ["model_name", "position"], registry=registry)
        self._positions: list[Counter] = []

    def watch(self, running: Callable[[], float], waiting: Callable[[], float], slot_usage: Callable[[], float]
              ) -> None:
        """The gauges, read when Prometheus scrapes."""
        if self.enabled:
            self._running.set_function(running)
            self._waiting.set_function(waiting)
            self._slot_usage.set_function(slot_usage)

    def request_admitted(self, prompt_tokens: int) -> None:
        if self.enabled:
            self.prompt_tokens.inc(prompt_tokens)

    def request_finished(self, finish_reason: str, outcome: str, *, prompt_tokens: int, generated_tokens: int,
                         e2e_s: float, queue_s: float | None, time_per_output_token_s: float | None) -> None:
        if not self.enabled:
            return
        reason = "error" if outcome == "error" else FINISHED_REASONS.get(finish_reason, "abort")
        self._success.labels(model_name=self._model_name, finished_reason=reason).inc()
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generated_tokens)
        self.e2e_latency.observe(e2e_s)
        if queue_s is not None:
            self.queue_time.observe(queue_s)
        if time_per_output_token_s is not None:
            self.time_per_output_token.observe(time_per_output_token_s)

    def record_step(self, stats: StepStats) -> None:
        if not self.enabled:
            return
        self.generation_tokens.inc(stats.emitted)
        for seconds in stats.first_token_s:
            self.time_to_first_token.observe(seconds)
        for seconds in stats.inter_token_s:
            self.inter_token_latency.observe(seconds)
        acceptance = stats.acceptance
        if acceptance.drafted:
            self.num_drafts.inc(acceptance.offers)
            self.num_draft_tokens.inc(acceptance.drafted)
            self.num_accepted_tokens.inc(acceptance.accepted)
            accepted = acceptance.accepted_by_position
            for position in range(len(acceptance.proposed_by_position)):  # 0 where nothing was accepted
                self._position(position).inc(accepted[position] if position < len(accepted) else 0)

    def _position(self, position: int) -> Counter:
        while len(self._positions) <= position:
            self._positions.append(self._accepted_per_position.labels(model_name=self._model_name,
                                                                      position=str(len(self._positions))))
        return self._positions[position]
