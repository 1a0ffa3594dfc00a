"""The adaptive bench's analysis: medians over rounds, the table blocked on the round, re-reading a saved run."""

from __future__ import annotations

import pytest

from bench.adaptive import (
    blocked_on_round,
    is_versus,
    medians,
    parse_log,
    parse_rounds,
    selection_bias,
    versus,
    versus_depths,
)

LOG = """\
  batch   2 round 1   depth 0:    15.1 tokens/s per request,    15.0 streamed, with 2 in flight; all 950 tokens in 6.0 s
  batch   2 round 1      auto:    20.0 tokens/s per request,    19.0 streamed, with 2 in flight; all 950 tokens in 5.0 s
  batch   2 round 2      auto:    10.0 tokens/s per request,     9.0 streamed, with 2 in flight; all 950 tokens in 9.0 s
  batch   2 round 2   depth 0:     7.5 tokens/s per request,     7.0 streamed, with 2 in flight; all 950 tokens in 9.9 s
  batch  16 round 1   depth 0:    74.8 tokens/s per request,    75.2 streamed, with 16 in flight
"""


def test_a_slow_round_moves_no_policy_once_blocked_on_the_round() -> None:
    fast = {"0": [10.0], "1": [12.0], "auto": [11.0]}
    slow = {p: [v[0], 0.7 * v[0]] for p, v in fast.items()}  # the same policies, the whole second round 30% slower
    assert blocked_on_round(slow) == pytest.approx(blocked_on_round(fast))
    assert medians(slow) != medians(fast)
    # Relative to the round's geometric mean: 10 / (10 * 12 * 11) ** (1 / 3).
    assert blocked_on_round(fast)["0"] == pytest.approx(10 / (10 * 12 * 11) ** (1 / 3))


def test_parse_log_reads_every_round_of_every_policy() -> None:
    per_request, streamed = parse_log(LOG)
    assert per_request == {2: {"0": [15.1, 7.5], "auto": [20.0, 10.0]}}  # batch 16 was cut short: left out
    assert streamed[2]["auto"] == [19.0, 9.0]
    # Two rounds: the median is the mean of auto over its round's geometric mean, sqrt(20 / 15.1) and sqrt(10 / 7.5).
    assert blocked_on_round(per_request[2])["auto"] == pytest.approx(((20 / 15.1) ** 0.5 + (10 / 7.5) ** 0.5) / 2)


VERSUS_LOG = """\
  batch   1 round 1   depth 4:    16.0 tokens/s per request,    16.0 streamed, with 1 in flight; all 950 tokens in 9.0 s
  batch   1 round 1      auto:    16.0 tokens/s per request,    16.4 streamed, with 1 in flight; all 950 tokens in 8.8 s
  batch   1 round 2      auto:    12.0 tokens/s per request,    12.1 streamed, with 1 in flight; all 950 tokens in 12. s
  batch   1 round 2   depth 4:    12.5 tokens/s per request,    12.4 streamed, with 1 in flight; all 950 tokens in 12. s
  batch   1 round 3   depth 4:    14.0 tokens/s per request,    14.0 streamed, with 1 in flight; all 950 tokens in 10. s
  batch   1 round 3      auto:    15.4 tokens/s per request,    15.4 streamed, with 1 in flight; all 950 tokens in 10. s
  batch   8 round 1   depth 0:    70.0 tokens/s per request,    70.0 streamed, with 8 in flight; all 950 tokens in 9.0 s
  batch   8 round 1      auto:    63.0 tokens/s per request,    63.0 streamed, with 8 in flight; all 950 tokens in 9.0 s
"""


def test_versus_pairs_auto_with_its_fixed_depth_round_by_round() -> None:
    per_request, _ = parse_rounds(VERSUS_LOG)
    assert is_versus(per_request)
    assert not is_versus(parse_log(LOG)[0])  # a full run: the same policies at every batch size
    at_1 = versus(per_request[1])
    assert at_1.depth == "4"
    assert at_1.ratios == pytest.approx([1.0, 12.0 / 12.5, 1.1])
    # The median of the ratios within each round (1.0), not the ratio of the medians (15.4 / 14.0 = 1.1), which
    # compares auto's and the depth's values from different rounds.
    assert at_1.ratio == pytest.approx(1.0)
    assert at_1.auto / at_1.fixed == pytest.approx(1.1)
    assert versus(per_request[8]).ratio == pytest.approx(0.9)


def test_versus_arguments() -> None:
    assert versus_depths(["1:4", "32:0"]) == {1: "4", 32: "0"}
    with pytest.raises(SystemExit, match="BATCH:DEPTH"):
        versus_depths(["8"])


def test_the_best_of_several_noisy_depths_flatters_the_best_fixed_depth() -> None:
    steady = {8: {"0": [70.0, 70.0, 70.0], "1": [60.0, 60.0, 60.0], "auto": [70.0, 70.0, 70.0]}}
    assert selection_bias(steady, trials=200).all_within == 1.0  # no noise: auto as good as the best shows as such
    # Seven depths equally good, every round off by ~9%: an auto just as good falls 5% short of the best of them often.
    noisy = {8: {str(d): [70.0 * f for f in (0.92, 1.0, 1.09)] for d in range(7)}}
    bias = selection_bias(noisy, trials=2000)
    assert bias.cell_sd == pytest.approx(0.087, abs=0.01)
    assert 0.3 < bias.within[8] < 0.8
