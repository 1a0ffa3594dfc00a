"""What every benchmark's fleet passes its services."""

from __future__ import annotations

from bench.common import service_args


def test_benchmark_services_compute_every_prompt_unless_told_to_reuse() -> None:
    """Each configuration gets the same prompts: a reused prefill would time the later rows without theirs."""
    assert service_args("target", ["--model", "m"]) == ["--model", "m", "--prefix-reuse", "off"]
    assert service_args("draft", ["--drafter", "model"])[-2:] == ["--prefix-reuse", "off"]
    assert service_args("target", ["--prefix-reuse", "on"]) == ["--prefix-reuse", "on"]
    assert service_args("router", ["--depth", "auto"]) == ["--depth", "auto"]
