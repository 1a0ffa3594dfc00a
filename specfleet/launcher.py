"""Starting and stopping a local deployment: redis-server, target, draft and router as processes."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("specfleet.up")


# Ports are handed to child processes, which bind them seconds later. A port taken from the kernel's ephemeral range
# (what binding port 0 returns) can meanwhile become the local end of any outgoing connection on this machine (a
# service connecting to Redis, a health check), and the child then fails with "Address already in use". Ports below
# that range are only ever taken by a process that asks for them by number.
LISTEN_PORTS_FROM = 10000
_handed_out: set[int] = set()


def ephemeral_port_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The ports the kernel picks from for outgoing connections and for binding port 0 (Linux's default if unknown)."""
    try:
        low, high = (int(field) for field in path.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _binds(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port that nothing listens on or connects from now, for a process about to be started to listen on: below the
    ephemeral range where that leaves room (see above), never the same one twice in this process."""
    low, _ = ephemeral_port_range()
    if low - LISTEN_PORTS_FROM >= 1000:
        for _ in range(200):
            port = random.randrange(LISTEN_PORTS_FROM, low)
            if port not in _handed_out and _binds(port):
                _handed_out.add(port)
                return port
    while True:  # no room below the ephemeral range (or all tried ports taken): the kernel's choice
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path | None = None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Deployment:
    """Processes started together and stopped together (in reverse order)."""

    log_dir: Path | None = None
    processes: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        out: IO | int | None = None
        log_path = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{name}.log"
            out = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if out else None,
                                 env={**os.environ, **(env or {})}, start_new_session=True)
        process = Process(name, popen, log_path)
        self.processes.append(process)
        log.info("started %s (pid %d)", name, popen.pid)
        return process

    def start_service(self, role: str, args: list[str], name: str | None = None) -> Process:
        return self.start(name or role, [sys.executable, "-m", "specfleet.cli", role, *args])

    def start_redis(self, port: int) -> Process:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install -y redis-server), "
                                    "or pass --redis-url to use a running Redis")
        return self.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no"])

    def stop(self, timeout_s: float = 10.0, in_order: bool = False) -> None:
        """SIGTERM to every process, then kills what ``timeout_s`` does not see out. ``in_order``: one at a time, in
        the reverse of their start order, so none outlives what it depends on (the router goes before the services
        it calls, Redis last) and no log fills with the others' absence; slower, as each exit waits for the last."""
        deadline = time.monotonic() + timeout_s
        waves = [[p] for p in reversed(self.processes)] if in_order else [list(reversed(self.processes))]
        for wave in waves:
            for process in wave:
                if process.popen.poll() is None:
                    process.popen.send_signal(signal.SIGTERM)
            for process in wave:
                try:
                    process.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in time; killing it", process.name)
                    process.popen.kill()
                    process.popen.wait()
        self.processes.clear()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_serving(process: Process, address: str, timeout_s: float = 600.0, tls_ca: str = "") -> None:
    """Blocks until ``address`` reports SERVING on grpc.health.v1 (over TLS trusting ``tls_ca``, when given); raises
    if the process dies first."""
    from specfleet.client import channel as open_channel

    deadline = time.monotonic() + timeout_s
    with open_channel(address, tls_ca) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.popen.poll() is not None:
                raise RuntimeError(f"{process.name} exited with code {process.popen.returncode} before serving"
                                   f"\n{process.log_tail()}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{process.name} at {address} not serving after {timeout_s:.0f} s"
                                   f"\n{process.log_tail()}")
            time.sleep(0.2)


def wait_redis(process: Process, port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {process.popen.returncode}\n{process.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"redis-server on port {port} did not answer PING in {timeout_s:.0f} s")
