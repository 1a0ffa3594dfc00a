"""Whether a KV cache fits before it is allocated: a service that cannot hold its slots should say so at start,
with the number it needs, rather than be killed by the kernel halfway through a long request.

On a CPU the cache's pages are only touched as sequences grow, so an allocation that is too large can succeed and
fail much later; on a GPU it fails at once but with an allocator's message, not ours.
"""

from __future__ import annotations

from pathlib import Path

import torch

GIB = 1024**3


class InsufficientMemoryError(ValueError):
    """The KV cache asked for does not fit the memory left on its device."""


def kv_cache_bytes(*, num_layers: int, num_slots: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """Bytes of keys and values for ``num_slots`` sequences of ``max_seq_len`` tokens."""
    per_token = 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
    return per_token * num_slots * max_seq_len


def available_bytes(device: torch.device) -> int | None:
    """Memory an allocation on ``device`` can still take (None: unknown). A CPU's is the kernel's estimate of
    what can be allocated without swapping, capped by the container's memory limit where it has one."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    found = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    return min(found) if found else None


def check_fits(needed: int, device: torch.device, what: str, hint: str) -> None:
    """Raises `InsufficientMemoryError` naming ``what`` needs ``needed`` bytes, and ``hint`` (how to ask for
    less), when ``device`` has less than that left."""
    available = available_bytes(device)
    if available is not None and needed > available:
        raise InsufficientMemoryError(f"{what} needs {needed / GIB:.2f} GiB on {device}, but only "
                                      f"{available / GIB:.2f} GiB is available: {hint}")


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """The room left under a cgroup v2 memory limit (a Kubernetes pod's), None without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        return None
