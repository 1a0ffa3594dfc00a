"""Linear layers that stay fast on CPU for every number of rows a forward carries (decode, verification, batches).

On CPU, ``F.linear`` runs MKL's sgemm, whose speed swings with the row count: a few rows can cost more than
several, and verification's handful of rows is slow too. oneDNN, with the weight reordered once into its blocked
layout, has no such cliff. Which kernel wins for a handful of rows differs between machines and builds, so a
`PrepackedLinear` holds both layouts and `choose_kernels` times both on the model's own weight shapes once at load,
for up to `TUNED_ROWS` rows; above that oneDNN wins everywhere we measured (bench/engine_kernels.md).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

TUNED_ROWS = 4
"""Row counts (tokens over the whole batch) up to which the kernel is chosen by timing; beyond it, oneDNN, which won
there on every machine measured: sgemm can win only among the few-row shapes (bench/engine_kernels.md)."""

SGEMM_MARGIN = 0.9
"""sgemm takes a row count only when it times under this fraction of oneDNN: a near tie is not worth the noise of
one timing at load (bench/engine_kernels.md)."""


def prepacking_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN can pack linear weights of ``dtype`` on this CPU: its bfloat16 path needs AVX-512 (BW, VL, DQ)
    or AVX-NE-CONVERT, which many CPUs lack (it raises there)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True


class PrepackedLinear(nn.Module):
    """An ``nn.Linear`` (same weight and bias) that also holds the weight in oneDNN's layout, and runs a forward
    on sgemm only for the row counts in ``sgemm_rows``."""

    def __init__(self, linear: nn.Linear, sgemm_rows: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.sgemm_rows = sgemm_rows
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features] -> [..., out_features]
        if x.numel() // x.shape[-1] in self.sgemm_rows:
            return self.sgemm(x)
        return self.onednn(x)

    def sgemm(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def onednn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def prepack_linears(model: nn.Module, *, tune: bool = True) -> int:
    """Replaces every ``nn.Linear`` of a CPU model in float32 or bfloat16 by a `PrepackedLinear` (in place, for
    inference only: the packed copy does not follow later changes to the weight) and, with ``tune``, picks each
    layer's kernel per row count by timing (`choose_kernels`). Returns how many it replaced; 0 where the model is
    elsewhere, or where oneDNN is missing or cannot pack its dtype on this CPU. Costs a second copy of the linear
    weights in memory."""
    first = next(model.parameters())
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.bfloat16):
        return 0
    if not prepacking_available(first.dtype):
        log.info("oneDNN cannot pack %s linear weights on this CPU: plain weights only", first.dtype)
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PrepackedLinear(child))
                replaced += 1
    log.debug("prepacked %d linear layers for oneDNN", replaced)
    if tune:
        choose_kernels(model)
    return replaced


def choose_kernels(model: nn.Module, max_rows: int = TUNED_ROWS) -> dict[tuple[int, int], frozenset[int]]:
    """Times sgemm and oneDNN on each distinct weight shape of the model's `PrepackedLinear` layers for 1 to
    ``max_rows`` rows and sets every layer's ``sgemm_rows`` to the row counts sgemm wins clearly. Returns the
    choice per (out_features, in_features)."""
    layers_by_shape: dict[tuple[int, int], list[PrepackedLinear]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, PrepackedLinear):
            layers_by_shape[tuple(module.weight.shape)].append(module)
    chosen: dict[tuple[int, int], frozenset[int]] = {}
    with torch.inference_mode():
        for shape, layers in layers_by_shape.items():
            layer = layers[0]
            rows_for_sgemm = set()
            for rows in range(1, max_rows + 1):
                x = torch.randn(rows, shape[1], dtype=layer.weight.dtype)
                if fastest_call(partial(layer.sgemm, x)) < SGEMM_MARGIN * fastest_call(partial(layer.onednn, x)):
                    rows_for_sgemm.add(rows)
            chosen[shape] = frozenset(rows_for_sgemm)
            for each in layers:
                each.sgemm_rows = chosen[shape]
    log.info("linear kernels by weight shape (rows on sgemm, the rest on oneDNN): %s",
             ", ".join(f"{out}x{inp}: {sorted(rows) or 'none'}" for (out, inp), rows in chosen.items()))
    return chosen


def fastest_call(kernel: Callable[[], object], calls: int = 3) -> float:
    """The fastest of a few timed calls after a warm one: the least disturbed by other work on the machine."""
    return fastest_calls([kernel], calls)[0]


def fastest_calls(kernels: list[Callable[[], object]], calls: int) -> list[float]:
    """Each kernel's fastest of ``calls`` timed calls after a warm one, the kernels taking turns so that a slow
    moment of the machine falls on all of them alike."""
    for kernel in kernels:
        kernel()
    best = [float("inf")] * len(kernels)
    for _ in range(calls):
        for i, kernel in enumerate(kernels):
            start = time.perf_counter()
            kernel()
            best[i] = min(best[i], time.perf_counter() - start)
    return best
