"""PrepackedLinear: the same function as nn.Linear for any number of rows, on either kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specfleet.engine.cpu_linear import (
    TUNED_ROWS,
    PrepackedLinear,
    choose_kernels,
    prepack_linears,
    prepacking_available,
)

pytestmark = pytest.mark.skipif(not prepacking_available(), reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("sgemm_rows", [frozenset(), frozenset(range(1, 40))])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, TUNED_ROWS + 1, 9, 33])
def test_prepacked_linear_equals_linear(rows: int, bias: bool, sgemm_rows: frozenset[int]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=bias)
    x = torch.randn(2, rows, 64)[:, :rows] if rows > 1 else torch.randn(1, 1, 64)
    with torch.inference_mode():
        torch.testing.assert_close(PrepackedLinear(linear, sgemm_rows)(x), linear(x), atol=1e-5, rtol=1e-5)


def test_prepack_replaces_every_linear_and_shares_the_weights() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4, bias=False)))
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    assert prepack_linears(model) == 2
    packed = [m for m in model.modules() if isinstance(m, PrepackedLinear)]
    # The very same parameters, so a state dict reads as before.
    assert len(packed) == 2 and all(m.weight is w for m, w in zip(packed, weights, strict=True))


def test_prepack_leaves_float64_alone() -> None:
    model = nn.Sequential(nn.Linear(8, 8)).double()
    assert prepack_linears(model) == 0
    assert type(model[0]) is nn.Linear


def test_kernels_are_chosen_once_per_weight_shape_and_only_for_few_rows() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 32))
    prepack_linears(model, tune=False)
    chosen = choose_kernels(model)
    assert set(chosen) == {(32, 16), (16, 32)}
    layers = [m for m in model.modules() if isinstance(m, PrepackedLinear)]
    # Layers of one shape share the choice, and every choice lies within the tuned row counts.
    assert layers[0].sgemm_rows == layers[2].sgemm_rows == chosen[(32, 16)]
    assert all(rows <= set(range(1, TUNED_ROWS + 1)) for rows in chosen.values())
