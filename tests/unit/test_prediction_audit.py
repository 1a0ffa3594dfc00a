"""The router's audit of the depth policy's predictions: measured over predicted, drafting apart from plain steps."""

from __future__ import annotations

import pytest

from router.prediction_audit import Calibration, PredictionAudit


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


def test_calibration_is_drafting_over_plain_goodput_against_predictions_per_batch_size() -> None:
    calibration = Calibration(half_life=1000, min_steps=2)
    for _ in range(2):
        # Drafting: 1.2x the predicted time for 0.9x the predicted tokens; plain: 0.9x the predicted time.
        calibration.add(16, True, predicted_ms=100.0, measured_ms=120.0, predicted_tokens=20.0, emitted_tokens=18)
        calibration.add(16, False, predicted_ms=80.0, measured_ms=72.0, predicted_tokens=16.0, emitted_tokens=16)
    assert calibration.factor(16) == pytest.approx((0.9 / 1.2) / (1 / 0.9), rel=1e-3)
    assert calibration.factor(14) == calibration.factor(16)  # the same power of two
    assert calibration.factor(8) == 1.0 and calibration.factor(32) == 1.0  # nothing measured there


def test_calibration_needs_steps_of_both_kinds_and_stays_within_its_clamp() -> None:
    calibration = Calibration(half_life=1000, min_steps=3, max_factor=2.0)
    for _ in range(3):
        calibration.add(2, True, 50.0, 50.0, 4.0, 12)  # 3x the predicted tokens
    assert calibration.factor(2) == 1.0  # no plain steps yet
    for _ in range(2):
        calibration.add(2, False, 40.0, 40.0, 2.0, 2)
    assert calibration.factor(2) == 1.0
    calibration.add(2, False, 40.0, 40.0, 2.0, 2)
    assert calibration.factor(2) == 2.0
    calibration.add(2, True, 0.0, 50.0, 4.0, 4)  # no prediction: not counted
    assert calibration.factor(2) == 2.0


def test_a_correction_that_holds_drafting_back_is_forgotten_after_half_life_plain_steps() -> None:
    calibration = Calibration(half_life=20, min_steps=2)
    for _ in range(4):  # drafting at half the predicted goodput: a correction of 0.5
        calibration.add(1, True, 20.0, 40.0, 2.0, 2)
    for _ in range(19):
        calibration.add(1, False, 10.0, 10.0, 1.0, 1)
    calibration.add(4, False, 10.0, 10.0, 1.0, 1)  # another batch size's plain steps do not age this one's
    assert calibration.factor(1) == pytest.approx(0.5, rel=1e-3)
    calibration.add(1, False, 10.0, 10.0, 1.0, 1)  # the 20th plain step in a row
    assert calibration.factor(1) == 1.0  # the prediction decides again
    for _ in range(2):  # and fresh drafting steps, as predicted now, renew the correction
        calibration.add(1, True, 20.0, 20.0, 2.0, 2)
    assert calibration.factor(1) == pytest.approx(1.0, rel=1e-3)
    calibration.add(1, True, 20.0, 40.0, 2.0, 2)
    for _ in range(19):  # a drafting step restarts the count
        calibration.add(1, False, 10.0, 10.0, 1.0, 1)
    assert calibration.factor(1) < 1.0


def test_calibration_follows_recent_steps() -> None:
    calibration = Calibration(half_life=10, min_steps=1)
    for _ in range(10):
        calibration.add(1, False, 10.0, 10.0, 1.0, 1)
    for _ in range(100):
        calibration.add(1, True, 20.0, 40.0, 2.0, 2)  # half the predicted goodput
    for _ in range(100):
        calibration.add(1, True, 20.0, 20.0, 2.0, 2)  # then as predicted
    assert calibration.factor(1) == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError):
        Calibration(half_life=0)
