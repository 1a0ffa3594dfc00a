"""The chi-square test the statistical losslessness tests share."""

from __future__ import annotations

import torch
from scipy.stats import chisquare


def chi_square_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of observed counts against expected ones (any matching shapes). A count in a cell the exact
    distribution rules out (expected 0) is an outright failure (p-value 0); cells expected fewer than 5 times
    are pooled into one, as the chi-square approximation wants."""
    observed, expected = observed.double().flatten(), expected.double().flatten()
    if observed[expected == 0].sum() > 0:
        return 0.0
    large = expected >= 5
    small = (expected > 0) & ~large
    f_obs, f_exp = observed[large], expected[large]
    if small.any():
        f_obs = torch.cat([f_obs, observed[small].sum(dim=0, keepdim=True)])
        f_exp = torch.cat([f_exp, expected[small].sum(dim=0, keepdim=True)])
    f_exp = f_exp * (f_obs.sum() / f_exp.sum())  # absorb float rounding of the tables
    return float(chisquare(f_obs.numpy(), f_exp.numpy()).pvalue)
