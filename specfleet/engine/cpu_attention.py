"""Which kernel attends a group of sequences on CPU, chosen by timing the candidates on the machine itself at start.

Three kernels compute the same attention. PyTorch's ``scaled_dot_product_attention`` is, on CPU, a flash kernel
tuned for one query per sequence over short caches and for long prefills. `grouped_attention` is two batched
matmuls in which each key-value head is read once for its whole group of query heads (GQA), which pays once reading
the cache is the cost: verification's few tokens per sequence, and decoding over long caches. `head_attention` is
the same matmuls one sequence and key-value head at a time: a sequence's first entries of one head are contiguous
in the cache, while the batch of them is not, and bfloat16's batched matmul copies such a batch before it starts.
Which wins moves with the query width (new tokens per sequence), the KV entries the group reads, the dtype, the
BLAS and the CPU (a BLAS may run a generic path on one vendor's CPUs and a tuned one on another's). So nothing here
is a constant measured elsewhere: `choose_attention_kernels` times the kernels on the model's own head shapes over a
small grid of widths and cache sizes, once per process and shape, and keeps which won where
(bench/engine_kernels.md).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F

from specfleet.engine.cpu_linear import fastest_calls
from specfleet.engine.native import load_library

log = logging.getLogger(__name__)

TIMED_WIDTHS = (1, 2, 3, 5, 9, 17)
"""Query widths timed at start: decoding (1), verification's chains and trees (2-17). A width between two of them
takes the verdicts of the one below; a wider one (a prefill's chunk) takes the flash kernel, built for it."""

TIMED_ROWS = (1, 8)
TIMED_LENGTHS = (256, 1024, 4096, 8192)
"""Groups timed at start: one sequence or eight (or as many as the runner has slots, if fewer), of each of these
cached lengths shorter than the runner's slots, and of the slots' own length (up to the last of these). A group takes
the verdict of the timed group nearest its own by ratio in both (the kernels' costs grow differently with each: the
per-head matmuls pay a call per sequence and head)."""

TIMED_CALLS = 5
"""Calls of each kernel per timed shape, the kernels taking turns; the fastest of each counts."""


class Kernel(Enum):
    """The CPU attention kernels: PyTorch's flash kernel, `grouped_attention`, `head_attention` and
    `native_attention` (where it could be built)."""

    FLASH = "flash"
    MATMULS = "matmuls"
    HEAD_MATMULS = "head matmuls"
    NATIVE = "native"


def timed_groups(max_rows: int, max_len: int) -> tuple[tuple[int, int], ...]:
    """(sequences, cached tokens each) timed for a runner of ``max_rows`` slots of ``max_len`` entries."""
    rows = sorted({min(r, max(max_rows, 1)) for r in TIMED_ROWS})
    longest = max(min(max_len, TIMED_LENGTHS[-1]), 1)
    lengths = sorted({length for length in TIMED_LENGTHS if length < longest} | {longest})
    return tuple((r, length) for r in rows for length in lengths)


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Softmax attention as batched matmuls, each key-value head shared by its group of query heads (GQA).

    q [rows, heads, width, head_dim]; keys, values [rows, kv_heads, kv_len, head_dim]; bias [rows, 1, 1, width,
    kv_len] added to the scores (0 or -inf). The query heads of one key-value head are stacked into one matrix so
    that each key is read once per group, not once per head. Returns [rows, heads, width, head_dim].
    """
    rows, heads, width, head_dim = q.shape
    kv_heads, kv_len = keys.shape[1], keys.shape[2]
    stacked = (q * head_dim ** -0.5).reshape(rows, kv_heads, heads // kv_heads * width, head_dim)
    scores = torch.matmul(stacked, keys.transpose(-1, -2)).view(rows, kv_heads, heads // kv_heads, width, kv_len)
    scores += bias
    weights = torch.softmax(scores, dim=-1).view(rows, kv_heads, -1, kv_len)
    return torch.matmul(weights, values).view(rows, heads, width, head_dim)


def head_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`grouped_attention` (same arguments, same result) as two matmuls per sequence and key-value head, each over
    that head's entries alone, which lie contiguous in the cache however long its slots."""
    rows, heads, width, head_dim = q.shape
    kv_heads, kv_len = keys.shape[1], keys.shape[2]
    group = heads // kv_heads * width
    stacked = (q * head_dim ** -0.5).reshape(rows, kv_heads, group, head_dim)
    scores = q.new_empty(rows, kv_heads, group, kv_len)
    for row in range(rows):
        for head in range(kv_heads):
            torch.mm(stacked[row, head], keys[row, head].t(), out=scores[row, head])
    scores.view(rows, kv_heads, heads // kv_heads, width, kv_len).add_(bias)
    weights = torch.softmax(scores, dim=-1)
    out = q.new_empty(rows, kv_heads, group, head_dim)
    for row in range(rows):
        for head in range(kv_heads):
            torch.mm(weights[row, head], values[row, head], out=out[row, head])
    return out.view(rows, heads, width, head_dim)


NATIVE_SOURCE = Path(__file__).with_suffix(".c")
NATIVE_HEAD_DIMS = (64, 128)
"""Head sizes cpu_attention.c has a kernel for (each compiled for its size, the head kept in registers)."""
NATIVE_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
"""The element types cpu_attention.c reads, and its entry point for each (``specfleet_attend_<name>``)."""


def native_attention_available(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether `native_attention` can serve these heads on this machine (built on first ask)."""
    return dtype in NATIVE_DTYPES and head_dim in NATIVE_HEAD_DIMS and _native_function(dtype) is not None


def native_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`grouped_attention` (same arguments, same result) by cpu_attention.c: each (sequence, key-value head) pair's
    keys and values read once, in blocks, for all its queries, on this process's CPU threads. Strided views are
    read in place: each head's entries contiguous, keys and values alike; the result is a view whose
    ``transpose(1, 2)`` is contiguous."""
    rows, heads, width, head_dim = q.shape
    kv_heads, kv_len = keys.shape[1], keys.shape[2]
    if not native_attention_available(head_dim, q.dtype) or q.device.type != "cpu" or keys.dtype != q.dtype:
        raise ValueError(f"the native attention kernel does not serve {q.dtype} heads of {head_dim} over a "
                         f"{keys.dtype} cache on {q.device}")
    if keys.stride() != values.stride() or keys.stride(3) != 1 or keys.stride(2) != head_dim:
        keys, values = keys.contiguous(), values.contiguous()
    if q.stride(3) != 1:
        q = q.contiguous()
    bias = bias.to(torch.float32).expand(rows, 1, 1, width, kv_len)  # the kernel adds a float32 bias whatever q's
    if bias.stride(4) != 1:
        bias = bias.contiguous()
    out = q.new_empty(rows, width, heads, head_dim).transpose(1, 2)
    status = _native_function(q.dtype)(
        rows, kv_heads, heads // kv_heads, width, kv_len, head_dim, q.data_ptr(), *q.stride()[:3], keys.data_ptr(),
        values.data_ptr(), *keys.stride()[:2], bias.data_ptr(), bias.stride(0), bias.stride(3), out.data_ptr(),
        *out.stride()[:3], head_dim ** -0.5, torch.get_num_threads())
    if status == -2:
        raise MemoryError("cpu_attention.c could not allocate its scratch")
    if status != 0:
        raise ValueError(f"cpu_attention.c has no kernel for heads of {head_dim}")
    return out


BIAS_KERNELS: dict[Kernel, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    Kernel.MATMULS: grouped_attention, Kernel.HEAD_MATMULS: head_attention, Kernel.NATIVE: native_attention}
"""The kernels other than PyTorch's flash kernel, which all take the mask as an additive bias: what a forward calls
for each, and what `choose_attention_kernels` times."""


@functools.cache
def _native_function(dtype: torch.dtype) -> Callable[..., int] | None:
    library = load_library(NATIVE_SOURCE)
    if library is None or dtype not in NATIVE_DTYPES:
        return None
    function = getattr(library, f"specfleet_attend_{NATIVE_DTYPES[dtype]}")
    size, pointer, stride = ctypes.c_int, ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [size] * 6 + [pointer, stride, stride, stride, pointer, pointer, stride, stride,
                                      pointer, stride, stride, pointer, stride, stride, stride, ctypes.c_float, size]
    function.restype = ctypes.c_int
    return function


@dataclass(frozen=True)
class AttentionKernels:
    """Which kernel won where it was timed: for each timed query width (rising), the winner at each timed group
    (``groups``: sequences, cached tokens each). A group takes the verdicts of the widest timed width not above its
    own, at the timed group nearest its own; a width beyond the widest timed, or below the narrowest, takes the flash
    kernel. Not one threshold per width: at wide groups over very long caches the matmuls' scores ([sequences, heads,
    width, kv_len]) outgrow the CPU's caches and the flash kernel can win again."""

    groups: tuple[tuple[int, int], ...] = ()
    winners: tuple[tuple[int, tuple[Kernel, ...]], ...] = ()

    def kernel(self, width: int, rows: int, kv_len: int) -> Kernel:
        """The kernel for a group of ``rows`` sequences reading ``kv_len`` cached entries each, ``width`` of them
        new."""
        if not self.winners or width > self.winners[-1][0] or width < self.winners[0][0]:
            return Kernel.FLASH
        verdicts = next(won for timed_width, won in reversed(self.winners) if timed_width <= width)
        return verdicts[min(range(len(self.groups)), key=lambda i: _distance(self.groups[i], rows, kv_len))]

    def describe(self) -> str:
        """One line for the log: each timed width's winners by group."""
        return "; ".join(f"width {width}: " + ", ".join(f"{rows}x{length} {kernel.value}" for (rows, length), kernel
                                                          in zip(self.groups, won, strict=True))
                         for width, won in self.winners)


def _distance(group: tuple[int, int], rows: int, kv_len: int) -> float:
    """How far a timed group is from ``rows`` x ``kv_len``: the ratios of their sequences and of their lengths."""
    return math.log(max(rows, 1) / group[0]) ** 2 + math.log(max(kv_len, 1) / group[1]) ** 2


FLASH_ONLY = AttentionKernels()
"""PyTorch's own kernel everywhere: what a forward attends with unless told otherwise (off CPU, always)."""


def always(kernel: Kernel, max_width: int = max(TIMED_WIDTHS)) -> AttentionKernels:
    """``kernel`` at every width up to ``max_width`` and every size (for tests and benchmarks of one kernel)."""
    return AttentionKernels(((1, 1),), ((1, (kernel,)), (max_width, (kernel,))))


def choose_attention_kernels(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, *,
                             max_rows: int, max_len: int) -> AttentionKernels:
    """Times the kernels on these head shapes over `TIMED_WIDTHS` x `timed_groups` with this process's CPU threads
    (up to a few seconds), and keeps which won where. Cached per shape, dtype, groups and thread count."""
    return _choose(num_heads, num_kv_heads, head_dim, dtype, timed_groups(max_rows, max_len), torch.get_num_threads())


@functools.cache
def _choose(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, groups: tuple[tuple[int, int], ...],
            threads: int) -> AttentionKernels:
    start = time.perf_counter()
    with torch.inference_mode():
        winners = tuple((width, tuple(_fastest_kernel(num_heads, num_kv_heads, head_dim, dtype, width, rows, kv_len)
                                      for rows, kv_len in groups))
                        for width in TIMED_WIDTHS)
    kernels = AttentionKernels(groups, winners)
    log.info("attention kernels by query width and group, sequences x cached tokens (%d query and %d key-value "
             "heads of %d, %s, %d threads; timed in %.1f s): %s", num_heads, num_kv_heads, head_dim,
             str(dtype).removeprefix("torch."), threads, time.perf_counter() - start, kernels.describe())
    return kernels


def _fastest_kernel(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, width: int, rows: int,
                    kv_len: int) -> Kernel:
    """The kernels on one group shaped as the engine reads it: ``rows`` sequences whose last ``width`` tokens are
    new, keys and values a view of the first ``kv_len`` entries of longer slots, a causal mask."""
    kv_len = max(kv_len, width)
    cache_shape = (rows, num_kv_heads, kv_len + 64, head_dim)
    keys = torch.randn(cache_shape, dtype=dtype)[:, :, :kv_len]
    values = torch.randn(cache_shape, dtype=dtype)[:, :, :kv_len]
    q = torch.randn(rows, num_heads, width, head_dim, dtype=dtype)
    positions = torch.arange(kv_len - width, kv_len)
    mask = (torch.arange(kv_len)[None, :] <= positions[:, None]).expand(rows, 1, width, kv_len)
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf")).unsqueeze(1)
    calls = {Kernel.FLASH: lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)}
    for kernel, attention in BIAS_KERNELS.items():
        if kernel is not Kernel.NATIVE or native_attention_available(head_dim, dtype):
            calls[kernel] = functools.partial(attention, q, keys, values, bias)
    times = fastest_calls(list(calls.values()), TIMED_CALLS)
    return min(zip(times, calls, strict=True), key=lambda pair: pair[0])[1]
