"""``specfleet up``'s flags against the services': same defaults, clear errors, argv that parses back.

Nothing here starts a process: ``up`` itself is replaced where ``main`` would call it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import socket

import pytest

from specfleet import cli
from specfleet.cli import SERVICES, build_parser, main
from specfleet.config import DraftConfig, RouterConfig, TargetConfig, from_arguments, to_arguments
from specfleet.launcher import free_port
from specfleet.up import Services, UpConfig, listening_ports, port_is_free, summary, threads_note

# The flags of `up` alone; every other flag of `up` is a service's.
UP_ONLY = {"--prompt", "--max-new-tokens", "--draft-model", "--port", "--http-port", "--redis-url", "--log-dir"}
# A valid value other than the default for each flag `up` shares with the services.
OTHER_VALUES = {"--model": "qwen2.5-coder-0.5b", "--drafter": "model", "--device": "cpu", "--dtype": "bfloat16",
                "--num-slots": 8,
                "--max-seq-len": 512, "--depth": "3", "--max-depth": 12, "--tree": "rsd-c", "--log-level": "DEBUG",
                "--self-draft": True, "--draft-ahead": True, "--prefill-alongside": True, "--backend": "llamacpp",
                "--threads": 1}
README_PROMPT = "Explain speculative decoding in one sentence."


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}


def recipients(action: argparse.Action) -> set[str]:
    """The services a shared flag's help names in its ``[...]`` prefix."""
    match = re.match(r"\[([^\]]+)\] ", action.help or "")
    assert match, f"{action.option_strings[0]}'s help does not say which service gets it: {action.help!r}"
    return set(SERVICES) if match[1] == "every process" else {role.strip() for role in match[1].split(",")}


def up_config(argv: list[str]) -> UpConfig:
    return from_arguments(UpConfig, build_parser().parse_args(["up", *argv]))


def test_up_without_flags_runs_every_service_at_its_own_defaults() -> None:
    assert up_config([]) == UpConfig()
    # The one value up sets itself: a local deployment serves the OpenAI API (a router alone serves none).
    assert UpConfig().services("", {}) == Services(TargetConfig(), DraftConfig(), RouterConfig(http_port=8000))


def test_every_flag_up_shares_with_a_service_has_its_default_type_choices_and_help() -> None:
    parsers = subcommands()
    up_flags = flags(parsers["up"])
    shared = set(up_flags) - UP_ONLY
    assert shared == set(OTHER_VALUES), "give each new shared flag a value in OTHER_VALUES"
    for flag in sorted(shared):
        ours = up_flags[flag]
        theirs = {role: flags(parsers[role])[flag] for role in SERVICES if flag in flags(parsers[role])}
        assert recipients(ours) <= set(theirs), f"{flag} is passed to a service that has no such flag"
        for role, action in theirs.items():
            assert (ours.default, ours.type, ours.choices) == (action.default, action.type, action.choices), (
                f"up {flag} differs from {role} {flag}")
            assert ours.help and action.help and ours.help.endswith(action.help), f"up {flag}: {role}'s help"


@pytest.mark.parametrize("flag", sorted(OTHER_VALUES))
def test_a_shared_flag_reaches_the_services_its_help_names(flag: str) -> None:
    value = OTHER_VALUES[flag]
    name = flag[2:].replace("-", "_")
    config = up_config([flag] if value is True else [flag, str(value)])
    assert getattr(config, name) == value
    services = config.services("", {}).by_role()
    for role in recipients(flags(subcommands()["up"])[flag]):
        assert getattr(services[role], name) == value, f"{flag} does not reach the {role}"


def test_the_services_listen_on_port_and_the_next_two_and_share_the_redis_url() -> None:
    config = up_config(["--port", "6000", "--redis-url", "redis://10.0.0.5:6380/2"])
    services = config.services("redis://10.0.0.5:6380/2", {"router": 9100, "target": 9102})
    assert (services.router.port, services.draft.port, services.target.port) == (6000, 6001, 6002)
    assert (services.router.targets, services.router.drafts) == ("127.0.0.1:6002", "127.0.0.1:6001")
    assert (services.router.metrics_port, services.draft.metrics_port, services.target.metrics_port) == (9100, 0, 9102)
    assert {c.redis_url for c in services.by_role().values()} == {"redis://10.0.0.5:6380/2"}


def test_the_draft_model_defaults_to_the_targets_and_an_ngram_draft_names_none() -> None:
    assert up_config(["--model", "qwen2.5-coder-1.5b", "--drafter", "model"]).services("", {}).draft.model == (
        "qwen2.5-coder-1.5b")
    assert up_config(["--model", "qwen2.5-coder-1.5b", "--drafter", "model", "--draft-model",
                      "qwen2.5-coder-0.5b"]).services("", {}).draft.model == "qwen2.5-coder-0.5b"
    ngram = up_config(["--model", "qwen2.5-coder-1.5b"]).services("", {})
    assert ngram.draft.model == DraftConfig().model
    assert ngram.target.model == "qwen2.5-coder-1.5b"
    llamacpp = up_config(["--model", "qwen2.5-coder-1.5b", "--drafter", "llamacpp"]).services("", {})
    assert (llamacpp.draft.drafter, llamacpp.draft.model) == ("llamacpp", "qwen2.5-coder-1.5b")  # the preset's GGUF


@pytest.mark.parametrize("argv", [
    [],
    ["--prompt", README_PROMPT],
    ["--model", "qwen2.5-coder-1.5b", "--drafter", "model", "--draft-model", "qwen2.5-coder-0.5b", "--device",
     "cpu", "--num-slots", "4", "--max-seq-len", "1024", "--depth", "4", "--max-depth", "16", "--tree", "rsd-s",
     "--port", "7100", "--redis-url", "redis://127.0.0.1:6379/0", "--log-level", "WARNING"],
    ["--depth", "0", "--drafter", "model", "--tree", "iid"],
    ["--drafter", "llamacpp", "--draft-ahead", "--threads", "1"],
])
def test_the_argv_up_passes_each_service_parses_back_into_the_config_it_meant(argv: list[str]) -> None:
    config = up_config(argv)
    metrics_ports = {"target": 9001, "draft": 9002, "router": 9003}
    services = config.services("redis://127.0.0.1:6390/0", metrics_ports).by_role()
    argvs = config.argvs("redis://127.0.0.1:6390/0", metrics_ports)
    parsers = subcommands()
    for role, meant in services.items():
        config_cls, _ = SERVICES[role]
        assert from_arguments(config_cls, parsers[role].parse_args(argvs[role])) == meant, role
        assert any(arg.startswith("--port=") for arg in argvs[role]), f"{role}'s argv does not say its port"


def test_to_arguments_names_only_what_differs_and_parses_back_values_that_look_like_flags() -> None:
    assert to_arguments(RouterConfig()) == []
    assert to_arguments(RouterConfig(), always=("port",)) == ["--port=50050"]
    config = RouterConfig(tokenizer="-odd-name", min_draft_gain=0.3, policy_refresh_s=0.25, drafts="")
    argv = to_arguments(config)
    assert len(argv) == 4
    assert from_arguments(RouterConfig, subcommands()["router"].parse_args(argv)) == config
    with pytest.raises(ValueError, match="no field portt"):
        to_arguments(RouterConfig(), always=("portt",))


@pytest.mark.parametrize(("argv", "flag"), [
    (["--num-slots", "0"], "--num-slots"),
    (["--max-seq-len", "8"], "--max-seq-len"),
    (["--depth", "9"], "--depth"),
    (["--depth", "deep"], "--depth"),
    (["--max-depth", "17"], "--max-depth"),
    (["--port", "0"], "--port"),
    (["--port", "65534"], "--port"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "5000"], "--max-new-tokens"),
    (["--draft-model", "smollm2-135m"], "--draft-model"),
    (["--redis-url", "127.0.0.1:6379"], "--redis-url"),
])
def test_an_invalid_value_fails_before_anything_starts_with_a_message_naming_its_flag(
        argv: list[str], flag: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "up", lambda config: pytest.fail(f"up started with {config}"))
    assert main(["up", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"specfleet up: {flag} "), error


@pytest.mark.parametrize(("argv", "flag"), [
    (["--drafter", "llama"], "--drafter"),
    (["--tree", "forest"], "--tree"),
    (["--num-slots", "many"], "--num-slots"),
    (["--log-level", "LOUD"], "--log-level"),
])
def test_a_value_of_the_wrong_kind_is_refused_by_the_parser_naming_its_flag(argv: list[str], flag: str) -> None:
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["up", *argv])
    assert exited.value.code == 2
    assert f"argument {flag}" in err.getvalue()


def test_the_readmes_first_command_parses_and_reaches_up(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[UpConfig] = []
    monkeypatch.setattr(cli, "up", lambda config: started.append(config) or 0)
    assert main(["up", "--prompt", README_PROMPT]) == 0
    assert started == [UpConfig(prompt=README_PROMPT)]


def test_up_help_says_what_it_does_and_explains_every_flag() -> None:
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["up", "--help"])
    assert exited.value.code == 0
    text = " ".join(out.getvalue().split())
    assert "redis-server" in text and "SERVING" in text and "Ctrl-C" in text
    for flag, action in flags(subcommands()["up"]).items():
        assert flag in text
        assert action.help and len(action.help) > 20, f"{flag} needs a help line"


def test_the_summary_names_the_draft_model_and_every_metrics_endpoint() -> None:
    config = up_config(["--drafter", "model", "--draft-model", "qwen2.5-coder-0.5b", "--model",
                        "qwen2.5-coder-1.5b"])
    text = summary(config.services("redis://127.0.0.1:7000/0", {"target": 9001, "draft": 9002, "router": 9003}),
                   "redis://127.0.0.1:7000/0")
    assert "router on 127.0.0.1:50050" in text
    assert "draft model qwen2.5-coder-0.5b on 50051" in text and "target qwen2.5-coder-1.5b on 50052" in text
    assert all(f"http://127.0.0.1:{port}/metrics" in text for port in (9001, 9002, 9003))


def test_up_moves_the_draft_and_target_off_ports_another_process_holds_and_refuses_a_held_public_port() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        # The target's port (--port + 2) is held: it listens elsewhere, and the router is told where.
        config = up_config(["--port", str(port - 2), "--http-port", "0"])
        ports = listening_ports(config)
        assert ports["router"] == port - 2 and ports["target"] != port and port_is_free(ports["target"])
        services = config.services("", {}, ports)
        assert (services.target.port, services.router.targets) == (ports["target"], f"127.0.0.1:{ports['target']}")
        with pytest.raises(ValueError, match=rf"port {port} \(--port\) is in use by another process"):
            listening_ports(up_config(["--port", str(port), "--http-port", "0"]))
        with pytest.raises(ValueError, match=rf"port {port} \(--http-port\) is in use"):
            listening_ports(up_config(["--port", str(free_port()), "--http-port", str(port)]))


def test_up_with_self_draft_starts_no_draft_service_and_tells_the_router() -> None:
    services = up_config(["--model", "/models/space", "--self-draft"]).services("", {})
    assert services.draft is None and list(services.by_role()) == ["target", "router"]
    assert services.router.self_draft and services.router.drafts == ""
    assert "drafts by the target itself" in summary(services, "redis://x")


def test_up_drafts_ahead_when_asked_and_says_the_services_then_compute_at_once() -> None:
    services = up_config(["--drafter", "llamacpp", "--draft-ahead"]).services("", {})
    assert services.router.draft_ahead and services.draft.drafter == "llamacpp"
    assert "drafting ahead, they compute at the same time" in threads_note(services)
    assert not up_config([]).services("", {}).router.draft_ahead


def test_up_says_how_the_services_share_the_cores() -> None:
    assert threads_note(up_config([]).services("", {})) == (
        "target (engine): every core; the router and the ngram draft need little CPU")
    note = threads_note(up_config(["--drafter", "model", "--threads", "2", "--backend", "llamacpp"]).services("", {}))
    assert note.startswith("target (llamacpp): 2 threads; draft (model): 2 threads; they compute in turn")
