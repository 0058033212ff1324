"""A generated sink that writes to Redis passes its own tests with the Redis of config.yml down.

The project is rendered, then given what a user writes for such a sink (a Config with
``redis_url``, an ``arrived`` that appends to a Redis stream) and tests in the two ways
its README shows: a stand-in client handed over by ``make_sink()``, and a local
``redis-server`` that a fixture starts on a free port. config.yml names a Redis on a
port where nothing listens, as a production address seen from a laptop or CI would be.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from redis_support import free_port, redis_binary
from template_support import clean_env, render, run_in

pytestmark = pytest.mark.slow

CONFIG = '''
"""Configuration of a sink writing to a Redis stream."""

from pydantic import Field

import cdk


class Config(cdk.SinkConfig):
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Where events go.")
    stream: str = Field("events", description="The stream events are appended to.")
'''

SINK = '''
"""Appends each event to a Redis stream."""

from typing import Any, Protocol

import redis

import cdk
from internal.config import Config


class Streams(Protocol):
    def xadd(self, name: str, fields: dict[str, str]) -> Any: ...


class RedisSink(cdk.Sink[Config]):
    def __init__(self, client: Streams | None = None) -> None:
        self.client = client

    def initialize(self, config: Config) -> None:
        if self.client is None:
            self.client = redis.Redis.from_url(config.redis_url, socket_timeout=2)

    def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
        assert self.client is not None
        for event in events:
            self.client.xadd(self.config.stream, {"id": event.get_id()})
        return cdk.SUCCESS
'''

TESTS = '''
"""The sink's contract tests, against a stand-in and against a local redis-server."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from cdk.testing import SinkTests, free_port
from internal.config import Config
from internal.sink import RedisSink

PORT = free_port()


class FakeRedis:
    """Keeps what the sink appends, in memory."""

    def __init__(self) -> None:
        self.streams: dict[str, list[dict[str, str]]] = {}

    def xadd(self, name: str, fields: dict[str, str]) -> str:
        self.streams.setdefault(name, []).append(fields)
        return "0-1"


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\\r\\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def local_redis() -> Iterator[None]:
    server = subprocess.Popen(
        ["redis-server", "--port", str(PORT), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while not answers(PORT):
        assert server.poll() is None and time.monotonic() < deadline, "redis-server failed"
        time.sleep(0.05)
    yield
    server.terminate()
    server.wait(10)


class TestWithAStandIn(SinkTests):
    sink_class = RedisSink
    config_class = Config
    project_dir = None  # the process tests build the real sink: TestWithLocalRedis runs them

    def make_sink(self) -> RedisSink:
        return RedisSink(client=FakeRedis())


class TestWithLocalRedis(SinkTests):
    sink_class = RedisSink
    config_class = Config
    project_dir = Path(__file__).resolve().parent.parent
    config: ClassVar[Mapping[str, Any]] = {"redis_url": f"redis://127.0.0.1:{PORT}/0"}
'''


def test_a_redis_sink_passes_its_tests_with_the_configured_redis_down(tmp_path: Path) -> None:
    binary = redis_binary()
    project = render(tmp_path, connector_type="sink", connector_name="sink-redis")
    down = free_port()  # nothing listens there: the "production" Redis is stopped
    for name, text in {
        "internal/config.py": CONFIG,
        "internal/sink.py": SINK,
        "tests/test_sink.py": TESTS,
        "config.yml": f"redis_url: redis://127.0.0.1:{down}/0\nstream: production\n",
    }.items():
        (project / name).write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    env = clean_env()
    env["PATH"] = f"{Path(binary).parent}:{Path(sys.executable).parent}:{env.get('PATH', '')}"
    result = run_in(
        project,
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-rA",
        "tests/test_sink.py",
        timeout=600,
        env=env,
    )
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    passed = {
        line.split("::")[1] for line in result.stdout.splitlines() if line.startswith("PASSED")
    }
    # Both ways ran the suite, and the local instance the process tests as well.
    assert passed == {"TestWithAStandIn", "TestWithLocalRedis"}, output
    assert "TestWithLocalRedis::test_process_serves_and_stops_on_sigterm" in result.stdout, output
