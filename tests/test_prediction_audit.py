"""The router's audit of the depth policy's predictions: measured over predicted, drafting apart from plain steps."""

from __future__ import annotations

import pytest

from router.prediction_audit import PredictionAudit


def test_ratios_are_sums_over_the_steps_of_each_kind() -> None:
    audit = PredictionAudit()
    audit.add(True, predicted_ms=100.0, measured_ms=150.0, predicted_tokens=20.0, emitted_tokens=15)
    audit.add(True, predicted_ms=100.0, measured_ms=110.0, predicted_tokens=20.0, emitted_tokens=17)
    audit.add(False, predicted_ms=80.0, measured_ms=84.0, predicted_tokens=16.0, emitted_tokens=16)
    assert audit.drafting.time_ratio() == pytest.approx(260 / 200)
    assert audit.drafting.token_ratio() == pytest.approx(32 / 40)
    assert audit.plain.time_ratio() == pytest.approx(1.05)
    assert audit.report() == ("2 drafting steps took 1.30x the predicted time and emitted 0.80x the predicted "
                              "tokens; 1 plain step took 1.05x the predicted time and emitted 1.00x the predicted "
                              "tokens")


def test_a_report_starts_the_tally_over() -> None:
    audit = PredictionAudit()
    assert audit.report() == ""
    audit.add(False, 80.0, 80.0, 16.0, 16)
    assert audit.report().startswith("1 plain step took 1.00x")
    assert audit.report() == ""
    audit.add(True, 100.0, 90.0, 20.0, 22)
    assert audit.report() == "1 drafting step took 0.90x the predicted time and emitted 1.10x the predicted tokens"


def test_steps_that_prefill_are_kept_apart() -> None:
    audit = PredictionAudit()
    audit.add(True, 100.0, 250.0, 20.0, 20, prefilled=True)
    audit.add(False, 80.0, 80.0, 16.0, 16)
    assert audit.plain.steps == 1 and audit.drafting.steps == 0
    assert audit.report() == ("1 plain step took 1.00x the predicted time and emitted 1.00x the predicted tokens; "
                              "1 prefilling drafting step took 2.50x the predicted time and emitted 1.00x the "
                              "predicted tokens")
