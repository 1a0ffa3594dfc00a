"""The test tree itself: what pytest needs of it to collect every test."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def test_test_modules_have_one_basename_each() -> None:
    """pytest imports test modules by basename (tests/ has no packages): two of a name stop the whole suite."""
    names = Counter(p.name for p in Path(__file__).resolve().parents[1].rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
