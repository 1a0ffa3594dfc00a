"""C kernels compiled on the machine that runs them, with its own vector instructions, and cached.

A shared library is built once per source, compiler and CPU (``-march=native`` code would fault on an older CPU
sharing the cache folder) under ``<cache>/native/`` and loaded with ctypes, whose calls release the GIL. Without a C
compiler, or with ``SPECFLEET_NATIVE_KERNELS=0``, nothing is built and callers keep PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from functools import cache
from pathlib import Path

from specfleet.models import cache_root

log = logging.getLogger(__name__)

COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared")
"""-ffast-math lets the compiler vectorize the sums and call the vector ``expf``; the kernels never produce an
infinity or NaN that the masking does not already (a query that may attend to nothing). -fopenmp links libgomp.so.1
by name, which resolves to the one PyTorch loaded, so the kernels share its threads."""

DISABLE_VARIABLE = "SPECFLEET_NATIVE_KERNELS"


@cache
def load_library(source: Path) -> ctypes.CDLL | None:
    """The shared library built from ``source`` for this machine (built now if not cached), or None when it
    cannot be: native kernels turned off, no C compiler, or a failed build (logged once)."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        log.info("native kernels off (%s=0): %s not built", DISABLE_VARIABLE, source.name)
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler (cc, or $CC) on this machine: %s not built, PyTorch's kernels only", source.name)
        return None
    library = cache_root() / "native" / f"{source.stem}-{_build_key(source, compiler)}.so"
    if not library.exists():
        try:
            _compile(compiler, source, library)
        except (OSError, subprocess.CalledProcessError) as error:
            output = getattr(error, "stderr", "") or ""
            log.warning("could not build %s (%s): PyTorch's kernels only. %s", source.name, error, output[-2000:])
            return None
    return ctypes.CDLL(str(library))


def _build_key(source: Path, compiler: str) -> str:
    """What the library depends on: the source, the compiler's version, the flags and this CPU's features."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(source.read_bytes())
    for part in (version, " ".join(COMPILE_FLAGS), _cpu_features()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _cpu_features() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _compile(compiler: str, source: Path, library: Path) -> None:
    """Builds into a temporary file beside ``library`` and renames it: processes starting together (a target and
    its drafts) may build the same library at once, and none may load a half-written one."""
    library.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=library.parent) as folder:
        built = Path(folder) / library.name
        subprocess.run([compiler, *COMPILE_FLAGS, str(source), "-o", str(built), "-lm"], check=True,
                       capture_output=True, text=True)
        os.replace(built, library)
    log.info("built %s for this machine in %.1f s: %s", source.name, time.perf_counter() - start, library)
