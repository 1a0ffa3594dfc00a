"""The README and docs/ say what is true: their links lead somewhere, the flags they name exist, the README's first
lines are the two commands a newcomer runs, and the test command is the script CI runs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from specfleet.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_flags() -> set[str]:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {flag for parser in commands.choices.values() for action in parser._actions
            for flag in action.option_strings}


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_lead_to_files(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_the_flags_named_exist(page: Path) -> None:
    known = all_flags() | {"--help", "--build-arg", "--set", "--create-namespace", "--from-literal", "--cert",
                           "--key", "--depths", "--part", "--rounds", "--versus"}  # docker, helm, kubectl, benches
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", page.read_text()))
    assert named <= known, f"{page.name} names flags no command has: {sorted(named - known)}"


def test_the_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README's first code block holds the two commands"
    commands = [line for line in block.group(1).splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert "pip install -q torch==2.13.0" in commands[0] and "specfleet up --prompt" in commands[0]
    assert commands[1] == "bash .ci/run"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ruff check ." in ci and ci.rstrip().endswith("pytest -q tests")
