"""Generates the gRPC stubs from proto/ with grpcio-tools; used by setup.py and specfleet.protos."""

from __future__ import annotations

from pathlib import Path


def generate_stubs(proto_root: Path, out_root: Path) -> None:
    """Runs protoc over ``proto_root/specfleet/v1/*.proto``, writing ``out_root/specfleet/v1/*_pb2*.py``."""
    from grpc_tools import protoc  # pinned to the grpcio version

    protos = sorted(proto_root.glob("specfleet/v1/*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root}/specfleet/v1")
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out_root}",
            f"--grpc_python_out={out_root}", f"--pyi_out={out_root}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[p.name for p in protos]}")
    (out_root / "specfleet" / "v1" / "__init__.py").write_text('"""Generated gRPC stubs."""\n')
