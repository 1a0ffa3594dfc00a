"""Native kernels: built once per source, compiler and CPU into the cache, and left out cleanly when they cannot be."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from specfleet.engine import native
from specfleet.engine.native import DISABLE_VARIABLE, load_library

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler here")

SOURCE = "int specfleet_answer(void) { return 42; }\n"


@pytest.fixture
def source(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("SPECFLEET_CACHE", str(tmp_path / "cache"))
    load_library.cache_clear()
    yield (tmp_path / "answer.c")
    load_library.cache_clear()


def test_a_library_is_built_once_then_loaded_from_the_cache(source: Path, monkeypatch) -> None:
    source.write_text(SOURCE)
    assert load_library(source).specfleet_answer() == 42
    [built] = (source.parent / "cache" / "native").glob("answer-*.so")
    load_library.cache_clear()
    monkeypatch.setattr(native, "_compile", lambda *_: pytest.fail("rebuilt a cached library"))
    assert load_library(source).specfleet_answer() == 42
    source.write_text(SOURCE.replace("42", "43"))  # a changed source is another library
    load_library.cache_clear()
    monkeypatch.undo()
    monkeypatch.setenv("SPECFLEET_CACHE", str(source.parent / "cache"))
    assert load_library(source).specfleet_answer() == 43
    assert len(list(built.parent.glob("answer-*.so"))) == 2


def test_a_source_that_does_not_build_leaves_pytorchs_kernels_with_the_compilers_message(source: Path,
                                                                                           caplog) -> None:
    source.write_text("int specfleet_answer(void) { return }\n")
    with caplog.at_level(logging.WARNING):
        assert load_library(source) is None
    assert "could not build answer.c" in caplog.text and "error" in caplog.text
    assert not list((source.parent / "cache" / "native").glob("*.so"))


def test_native_kernels_can_be_turned_off(source: Path, monkeypatch) -> None:
    source.write_text(SOURCE)
    monkeypatch.setenv(DISABLE_VARIABLE, "0")
    assert load_library(source) is None
    assert not (source.parent / "cache").exists()
