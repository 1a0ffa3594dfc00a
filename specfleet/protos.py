"""The gRPC modules generated from ``proto/specfleet/v1`` (built at install time, never checked in).

Only the thin transport layers (the three servers and their clients) import this module.
``setup.py`` generates the stubs when the package is built; in a source checkout whose stubs are
missing or older than the ``.proto`` files, they are regenerated here on first import.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from specfleet._stubgen import generate_stubs

_SOURCE_ROOT = Path(__file__).resolve().parent.parent
_PROTO_ROOT = _SOURCE_ROOT / "proto"
_STUB_DIR = _SOURCE_ROOT / "specfleet" / "v1"


def _stubs_stale() -> bool:
    if not _PROTO_ROOT.is_dir():
        return False  # installed package: stubs were built with it
    protos = list(_PROTO_ROOT.glob("specfleet/v1/*.proto"))
    stubs = list(_STUB_DIR.glob("*_pb2*.py"))
    if len(stubs) < 2 * len(protos):
        return True
    return max(p.stat().st_mtime for p in protos) > min(s.stat().st_mtime for s in stubs)


if _stubs_stale():
    generate_stubs(_PROTO_ROOT, _SOURCE_ROOT)
    importlib.invalidate_caches()

from specfleet.v1 import (  # noqa: E402
    draft_pb2,
    draft_pb2_grpc,
    generate_pb2,
    generate_pb2_grpc,
    session_pb2,
    target_pb2,
    target_pb2_grpc,
)

__all__ = ["draft_pb2", "draft_pb2_grpc", "generate_pb2", "generate_pb2_grpc", "session_pb2",
           "target_pb2", "target_pb2_grpc", "generate_stubs"]
