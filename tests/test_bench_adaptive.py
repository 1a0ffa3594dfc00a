"""The adaptive bench's analysis: medians over rounds, the table blocked on the round, re-reading a saved run."""

from __future__ import annotations

import pytest

from bench.adaptive import blocked_on_round, medians, parse_log

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
