"""A real Redis server for tests and benchmarks, on a free loopback port.

The binary is Debian's ``redis-server`` (``.ci/run`` installs it), else ``$REDIS_SERVER``.
It runs without persistence (``--save '' --appendonly no``) in a temporary directory.
Fixture, registered by tests/conftest.py: ``redis_server`` (one per test; ``.url(db)`` is
a ``redis://`` URL, ``.stop()`` and ``.start()`` take it down and up on the same port).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Seconds the server may take to answer PING.
START_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    """The server binary, or a skip (a failure in CI, where it must run) saying how to get it."""
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if binary:
        return binary
    message = "redis-server is not installed (apt-get install redis-server, or set $REDIS_SERVER)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; :meth:`stop` and :meth:`start` keep its port."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary, self.directory = binary, directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)  # polling the port: a server says nothing when it is ready
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    binary = redis_binary()
    with tempfile.TemporaryDirectory(prefix="cdk-redis-") as directory:
        server = RedisServer(binary, Path(directory)).start()
        try:
            yield server
        finally:
            server.stop()
