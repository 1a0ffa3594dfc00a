"""Builds the gRPC stubs from proto/ before the package is built (they are never checked in)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithStubs(build_py):
    def run(self) -> None:
        spec = importlib.util.spec_from_file_location("_protos_gen", ROOT / "specfleet" / "_stubgen.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate_stubs(ROOT / "proto", ROOT)
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
