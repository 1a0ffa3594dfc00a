"""`free_port` hands out ports for child processes to listen on later: never from the kernel's ephemeral range (where
an outgoing connection can take the port before the child binds it), never one that is in use, never twice."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from specfleet import launcher
from specfleet.launcher import LISTEN_PORTS_FROM, ephemeral_port_range, free_port


def test_ports_come_from_below_the_ephemeral_range_and_are_never_repeated() -> None:
    low, _ = ephemeral_port_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(LISTEN_PORTS_FROM <= port < low for port in ports)
    for port in ports[:20]:  # each is free to listen on
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            s.listen()


def test_a_port_someone_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        monkeypatch.setattr(launcher, "LISTEN_PORTS_FROM", taken)
        monkeypatch.setattr(launcher, "ephemeral_port_range", lambda: (taken + 1000, 60999))
        picks = iter([taken, taken, taken + 1])
        monkeypatch.setattr(launcher.random, "randrange", lambda _low, _high: next(picks))
        launcher._handed_out.discard(taken + 1)
        assert free_port() == taken + 1


def test_without_room_below_the_ephemeral_range_the_kernel_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "ephemeral_port_range", lambda: (LISTEN_PORTS_FROM + 10, 60999))
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_the_range_is_read_from_the_kernel_or_defaults(tmp_path: Path) -> None:
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("40000\t50000\n")
    assert ephemeral_port_range(ranges) == (40000, 50000)
    assert ephemeral_port_range(tmp_path / "missing") == (32768, 60999)
    ranges.write_text("garbage\n")
    assert ephemeral_port_range(ranges) == (32768, 60999)
