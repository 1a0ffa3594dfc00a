"""Where a service computes: its machine and, on the CPU, the cores it may run on. Services report both (GetInfo),
so a router drafting ahead can tell whether a draft service and a CPU target take the same cores from each other
(then a draft made during a verify slows that verify) or run side by side."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence


def host_name() -> str:
    return socket.gethostname()


def compute_cores(on_cpu: bool) -> tuple[int, ...]:
    """The CPU cores this process may run on (its affinity, as `taskset` sets it) where it computes on the CPU;
    none where an accelerator does the work."""
    return tuple(sorted(os.sched_getaffinity(0))) if on_cpu else ()


def share_cores(host_a: str, cores_a: Sequence[int], host_b: str, cores_b: Sequence[int]) -> bool:
    """Whether two services compute on some of the same CPU cores of one machine."""
    return bool(host_a) and host_a == host_b and not set(cores_a).isdisjoint(cores_b)
