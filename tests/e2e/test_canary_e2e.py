"""The losslessness canary on the real services: a router with ``--canary-share 1`` replays every finished greedy
request by plain decoding on SmolLM2 and finds no difference; a sampled request is not replayed."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from specfleet.client import make_request, stream
from specfleet.launcher import free_port

pytestmark = pytest.mark.real_model

PROMPTS = ["def fibonacci(n):", "The three primary colors are", "for i in range(10):", "Paris is the capital of",
           "import os\nimport sys\n", "A haiku about the sea:", "SELECT name FROM users WHERE", "1, 1, 2, 3, 5, 8,"]


def counters(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def test_the_canary_finds_speculation_changed_nothing(cluster) -> None:
    metrics_port = free_port()
    router = cluster.router("router-canary", target="target", draft="ngram", depth=4,
                            extra=["--canary-share", "1", "--metrics-port", str(metrics_port)])
    for i, prompt in enumerate(PROMPTS):
        list(stream(router, make_request(prompt, max_new_tokens=24, ignore_eos=True), timeout_s=120))
        deadline = time.monotonic() + 120  # one replay at a time: let each finish before the next request ends
        while counters(metrics_port)["specfleet_canary_replays_total"] < i + 1:
            assert time.monotonic() < deadline, "the canary did not replay the request"
            time.sleep(0.1)
    list(stream(router, make_request(PROMPTS[0], max_new_tokens=8, temperature=0.8, seed=3), timeout_s=120))
    time.sleep(1.0)
    found = counters(metrics_port)
    assert found["specfleet_canary_replays_total"] == len(PROMPTS)  # the sampled one was not replayed
    assert found["specfleet_canary_mismatches_total"] == 0
    assert found["specfleet_accepted_tokens_total"] > 0  # the requests did speculate
