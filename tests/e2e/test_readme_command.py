"""The README's first command, as written, after its install steps (which `.ci/run` has just run): `specfleet up
--prompt ...` starts Redis, target, draft and router on this machine, answers the prompt with the real SmolLM2, and
stops everything again."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.real_model


def readme_up_command() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block
    first = next(line for line in block.group(1).splitlines() if line and not line.startswith("#"))
    up = first.rsplit("&& ", 1)[1]
    assert up.startswith("specfleet up ")
    return shlex.split(up)


def test_the_readme_first_command_answers_a_real_request(smollm2_dir: Path, tmp_path: Path) -> None:
    argv = readme_up_command()
    bin_dir = str(Path(sys.executable).parent)  # where pip put the `specfleet` script
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "specfleet is up" in done.stdout + done.stderr
    answer = re.search(r"\n\[(\d+) tokens, finish: (\w+); speculation: (\d+) steps", done.stdout)
    assert answer, done.stdout[-3000:]
    assert int(answer.group(1)) > 0 and answer.group(2) in ("eos", "length", "stop")
