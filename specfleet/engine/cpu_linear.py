"""Linear layers that stay fast on CPU when a forward carries several tokens (verification, batches).

On CPU, ``F.linear`` runs MKL's sgemm, which is at its best for one row (a matrix-vector product) but
handles a few rows poorly: measured on a 2-core Xeon over SmolLM2-135M's weights, 5 rows cost 2.0x one
row and 9 rows 2.6x. oneDNN with the weight reordered once into its blocked layout costs 1.6x and 1.8x
there, yet is slower for one or two rows. So a `PrepackedLinear` keeps both layouts and picks by rows:
speculation verifies depth + 1 tokens per sequence, which is exactly the few-rows case.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MIN_PACKED_ROWS = 4
"""Rows (tokens over the whole batch) from which the oneDNN kernel beats sgemm; measured, see above."""


def prepacking_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PrepackedLinear(nn.Module):
    """An ``nn.Linear`` (same weight and bias) that also holds the weight in oneDNN's layout for many rows."""

    def __init__(self, linear: nn.Linear, min_packed_rows: int = MIN_PACKED_ROWS) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.min_packed_rows = min_packed_rows
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features] -> [..., out_features]
        if x.numel() < self.min_packed_rows * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def prepack_linears(model: nn.Module) -> int:
    """Replaces every ``nn.Linear`` of a CPU model in float32 or bfloat16 by a `PrepackedLinear` (in place, for
    inference only: the packed copy does not follow later changes to the weight). Returns how many it replaced;
    0 where the model is elsewhere or oneDNN is missing. Costs a second copy of the linear weights in memory."""
    first = next(model.parameters())
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.bfloat16) or not prepacking_available():
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PrepackedLinear(child))
                replaced += 1
    log.debug("prepacked %d linear layers for oneDNN", replaced)
    return replaced
