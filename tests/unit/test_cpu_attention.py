"""The CPU attention choice: which kernel a group's width and size take, and how the choice is made by timing."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from specfleet.engine import cpu_attention
from specfleet.engine.cpu_attention import (
    FLASH_ONLY,
    TIMED_WIDTHS,
    AttentionKernels,
    Kernel,
    always,
    choose_attention_kernels,
    grouped_attention,
    native_attention,
    native_attention_available,
    timed_groups,
)

FLASH, MATMULS, HEAD = Kernel.FLASH, Kernel.MATMULS, Kernel.HEAD_MATMULS


def test_a_group_takes_the_verdict_of_the_nearest_timed_group_and_the_widest_timed_width_below() -> None:
    groups = ((1, 256), (1, 8192), (8, 256), (8, 8192))
    kernels = AttentionKernels(groups, ((1, (FLASH, MATMULS, MATMULS, HEAD)), (2, (MATMULS,) * 4),
                                        (5, (FLASH, MATMULS, FLASH, FLASH))))
    assert kernels.kernel(1, 1, 256) is FLASH and kernels.kernel(1, 1, 1400) is FLASH  # nearer 256 than 8192
    assert kernels.kernel(1, 1, 1500) is MATMULS and kernels.kernel(1, 2, 7000) is MATMULS
    assert kernels.kernel(1, 8, 7000) is HEAD and kernels.kernel(1, 32, 10**5) is HEAD  # past the largest timed
    assert kernels.kernel(2, 1, 1) is MATMULS and kernels.kernel(4, 1, 1) is MATMULS  # 3 and 4 follow 2
    # Where the flash kernel won again at the largest group.
    assert kernels.kernel(5, 1, 256) is FLASH and kernels.kernel(5, 1, 8000) is MATMULS
    assert kernels.kernel(5, 8, 8000) is FLASH
    assert kernels.kernel(6, 1, 8000) is FLASH  # beyond the widest timed: a prefill's chunk, the flash kernel's
    assert AttentionKernels(((1, 256),), ((2, (MATMULS,)),)).kernel(1, 1, 256) is FLASH  # below the narrowest too
    assert FLASH_ONLY.kernel(1, 8, 10**5) is FLASH and FLASH_ONLY.kernel(3, 8, 10**5) is FLASH
    assert always(HEAD).kernel(1, 1, 1) is HEAD and always(HEAD).kernel(max(TIMED_WIDTHS), 64, 10**5) is HEAD
    assert always(HEAD, 8).kernel(9, 1, 1) is FLASH
    assert kernels.describe().startswith("width 1: 1x256 flash, 1x8192 matmuls, 8x256 matmuls, 8x8192 head matmuls;")


def test_the_choice_times_every_width_and_group_once_per_shape(monkeypatch) -> None:
    timed: list[tuple[int, int, int]] = []

    def matmuls_from_4096_entries_heads_at_width_3(heads, kv_heads, head_dim, dtype, width, rows, kv_len) -> Kernel:
        timed.append((width, rows, kv_len))
        return HEAD if width == 3 else MATMULS if rows * kv_len >= 4096 else FLASH

    monkeypatch.setattr(cpu_attention, "_fastest_kernel", matmuls_from_4096_entries_heads_at_width_3)
    cpu_attention._choose.cache_clear()
    try:
        kernels = choose_attention_kernels(6, 2, 8, torch.float64, max_rows=32, max_len=8192)
        # The same process times a shape once.
        assert choose_attention_kernels(6, 2, 8, torch.float64, max_rows=32, max_len=8192) is kernels
    finally:
        cpu_attention._choose.cache_clear()
    groups = timed_groups(32, 8192)
    assert sorted(timed) == sorted((w, rows, kv_len) for w in TIMED_WIDTHS for rows, kv_len in groups)
    assert kernels.groups == groups
    assert [width for width, _ in kernels.winners] == list(TIMED_WIDTHS)
    assert kernels.kernel(3, 1, 1) is HEAD and kernels.kernel(2, 1, 1500) is FLASH
    assert kernels.kernel(17, 1, 5000) is MATMULS and kernels.kernel(17, 8, 600) is MATMULS


def test_only_groups_the_runner_can_hold_are_timed() -> None:
    assert timed_groups(32, 8192) == tuple((r, n) for r in (1, 8) for n in (256, 1024, 4096, 8192))
    assert timed_groups(32, 16384) == timed_groups(8, 8192)
    assert timed_groups(4, 2000) == ((1, 256), (1, 1024), (1, 2000), (4, 256), (4, 1024), (4, 2000))
    assert timed_groups(1, 100) == ((1, 100),)


def test_timing_the_real_kernels_gives_a_verdict_for_every_width_and_group() -> None:
    kernels = choose_attention_kernels(4, 2, 16, torch.float32, max_rows=8, max_len=8192)
    assert [width for width, _ in kernels.winners] == list(TIMED_WIDTHS)
    assert all(len(won) == len(kernels.groups) and set(won) <= set(Kernel) for _, won in kernels.winners)
    assert "width 1: 1x256 " in kernels.describe()


requires_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                                       reason="no C compiler: the native kernel cannot be built here")


@requires_compiler
def test_the_native_kernel_is_timed_where_it_serves_the_heads(monkeypatch) -> None:
    """Built on this machine for float32 and bfloat16 heads of 64 and 128; other dtypes and head sizes keep PyTorch's
    kernels."""
    assert native_attention_available(64, torch.float32) and native_attention_available(128, torch.bfloat16)
    assert not native_attention_available(64, torch.float16) and not native_attention_available(80, torch.float32)
    candidates: list[int] = []
    monkeypatch.setattr(cpu_attention, "fastest_calls", lambda calls, _: candidates.append(len(calls)) or
                        [1.0] * (len(calls) - 1) + [0.5])
    assert cpu_attention._fastest_kernel(4, 2, 64, torch.float32, 2, 1, 100) is Kernel.NATIVE
    assert cpu_attention._fastest_kernel(4, 2, 16, torch.float32, 2, 1, 100) is HEAD
    assert candidates == [4, 3]


@requires_compiler
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("width", [1, 3, 17])
def test_native_attention_reads_strided_views_in_place(head_dim: int, width: int) -> None:
    """Queries as the engine passes them (a transposed view of the packed tokens), keys and values views of longer
    slots: the result equals the batched matmuls', and its token-major transpose is contiguous."""
    g = torch.Generator().manual_seed(head_dim + width)
    rows, heads, kv_heads, kv_len = 3, 6, 2, 150
    q = torch.randn(rows, width, heads, head_dim, generator=g).transpose(1, 2)
    keys, values = (torch.randn(rows, kv_heads, kv_len + 7, head_dim, generator=g)[:, :, :kv_len] for _ in range(2))
    positions = torch.tensor([kv_len, 90, 40])[:, None] - width + torch.arange(width)
    mask = (torch.arange(kv_len)[None, None, :] <= positions[:, :, None])[:, None]
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf")).unsqueeze(1)
    out = native_attention(q, keys, values, bias)
    torch.testing.assert_close(out, grouped_attention(q, keys, values, bias), atol=1e-5, rtol=1e-5)
    assert out.transpose(1, 2).is_contiguous()


@requires_compiler
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("heads_per_kv", "width"), [(1, 1), (3, 1), (3, 2), (7, 1), (2, 9)])
def test_native_attention_over_several_blocks_with_masked_spans(head_dim: int, heads_per_kv: int, width: int) -> None:
    """Caches longer than the kernel's blocks, whose last block is partial: a full row, a shorter row (its last
    blocks all masked), and a row seeing only a window of recent entries (its first block all masked), for groups
    small enough to take a sum per query and key and larger ones that take the folds."""
    g = torch.Generator().manual_seed(head_dim * width + heads_per_kv)
    rows, kv_heads, kv_len = 3, 2, 1300
    q = torch.randn(rows, kv_heads * heads_per_kv, width, head_dim, generator=g)
    keys, values = (torch.randn(rows, kv_heads, kv_len, head_dim, generator=g) for _ in range(2))
    positions = torch.tensor([kv_len, 700, kv_len])[:, None] - width + torch.arange(width)
    keys_seen = torch.arange(kv_len)[None, None, :]
    mask = keys_seen <= positions[:, :, None]
    mask[2] &= keys_seen[0] > positions[2, :, None] - 300
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))[:, None, None]
    torch.testing.assert_close(native_attention(q, keys, values, bias), grouped_attention(q, keys, values, bias),
                               atol=1e-5, rtol=1e-5)


@requires_compiler
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("heads_per_kv", "width"), [(3, 1), (3, 3)])
def test_native_attention_in_bfloat16_reads_the_cache_as_stored(head_dim: int, heads_per_kv: int, width: int) -> None:
    """A bfloat16 cache is read as it is stored and the arithmetic done in float32: the result is the float32
    kernel's over the same (bfloat16) numbers, rounded once to bfloat16, and PyTorch's bfloat16 matmuls agree to
    their own rounding."""
    g = torch.Generator().manual_seed(head_dim + 10 * width)
    rows, kv_heads, kv_len = 2, 2, 700
    q = torch.randn(rows, kv_heads * heads_per_kv, width, head_dim, generator=g).to(torch.bfloat16)
    keys, values = (torch.randn(rows, kv_heads, kv_len + 9, head_dim, generator=g).to(torch.bfloat16)[:, :, :kv_len]
                    for _ in range(2))
    positions = torch.tensor([kv_len, 333])[:, None] - width + torch.arange(width)
    mask = (torch.arange(kv_len)[None, None, :] <= positions[:, :, None])[:, None]
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf")).unsqueeze(1)
    out = native_attention(q, keys, values, bias)
    assert out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
    in_float32 = native_attention(q.float(), keys.float(), values.float(), bias)
    torch.testing.assert_close(out, in_float32.to(torch.bfloat16), atol=0, rtol=0)
    torch.testing.assert_close(out.float(), grouped_attention(q, keys, values, bias).float(), atol=2e-2, rtol=2e-2)
