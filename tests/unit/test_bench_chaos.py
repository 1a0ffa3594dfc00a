"""The chaos harness's pure parts: gaps, percentiles, fault statuses and the fuzz generator."""

from __future__ import annotations

import json
import random

import pytest

from bench.chaos import (
    ScenarioResult,
    StreamRun,
    is_fault,
    percentile,
    scenario_names,
    table,
    worst_gap_ms,
)
from bench.chaos_fuzz import fuzz_cases
from specfleet.protos import generate_pb2


def test_the_worst_gap_is_between_messages_not_before_the_first() -> None:
    assert worst_gap_ms([]) == 0.0
    assert worst_gap_ms([5.0]) == 0.0
    assert worst_gap_ms([10.0, 10.1, 10.4, 10.45]) == pytest.approx(300.0)
    run = StreamRun(arrivals=[1.0, 1.05, 1.5, 1.6])
    assert run.gap_ms == pytest.approx(450.0) and run.worst_gap_end == 1.5


def test_percentiles_are_measured_values() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
    assert percentile([7.0], 1) == 7.0


def test_only_a_broken_hung_or_lost_server_is_a_fault() -> None:
    for answer in ("OK", "INVALID_ARGUMENT", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "HTTP 400", "HTTP 404",
                   "HTTP 200", "HTTP 200, then error invalid_argument"):
        assert not is_fault(answer), answer
    for fault in ("UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "TRANSPORT", "HTTP 500", "HTTP 503",
                  "HTTP 200, then error internal"):
        assert is_fault(fault), fault


def test_the_fuzz_is_reproducible_and_every_request_is_a_protobuf_message() -> None:
    cases = fuzz_cases(random.Random(3), 400, vocab=49152)
    again = fuzz_cases(random.Random(3), 400, vocab=49152)
    assert [c.kind for c in cases] == [c.kind for c in again]
    kinds = {c.kind.split(" ")[0] for c in cases}
    assert {"HTTP", "random", "truncated", "abort", "duplicate", "valid"} <= kinds
    for case in cases:
        if case.request is not None:
            parsed = generate_pb2.GenerateRequest.FromString(case.request.SerializeToString())
            assert parsed == case.request
        if case.kind == "valid":
            assert case.request.WhichOneof("prompt") and 1 <= case.request.stopping.max_new_tokens <= 4
        if case.raw is not None:
            assert case.method in ("Generate", "GenerateStream", "Abort", "GetServerInfo") and case.raw


def test_scenarios_are_picked_by_name_or_number_in_the_harness_order() -> None:
    assert scenario_names(["fuzz", "1"]) == ["kill9", "fuzz"]
    with pytest.raises(SystemExit):
        scenario_names(["nope"])


def test_a_row_says_which_bar_was_missed() -> None:
    result = ScenarioResult("x")
    result.add_streams([StreamRun(tokens=[1, 2], arrivals=[0.0, 0.2]), StreamRun(status="UNAVAILABLE")],
                       [[1, 2], [1, 2]], new_tokens=2)
    result.check("0 failed", result.failed == 0)
    result.check("fast", True)
    row = table([result]).splitlines()[-1]
    assert result.failed == 1 and result.wrong == 0
    assert "| 200 |" in row and "FAIL: 0 failed" in row and "UNAVAILABLE 1" in row
    assert json.loads(json.dumps(result.to_json()))["statuses"] == {"OK": 1, "UNAVAILABLE": 1}
