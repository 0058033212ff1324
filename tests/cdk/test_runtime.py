"""The process lifecycle: real connector processes, and the services in-process.

Each process test writes a tiny connector script into ``tmp_path`` and runs it with the
current interpreter, the template's project directory on ``PYTHONPATH``. Tests
synchronise on the lines the process prints (its ready line, say), never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

import cdk
from cdk.codec import to_binary
from cdk.config import ENVIRONMENT
from cdk.runtime import ServiceError, SinkService, SourceService, _Signals

PROJECT = Path(__file__).resolve().parents[2] / "{{cookiecutter.connector_name}}"
TOKEN = "tok-91c0d7a2b3e4f5a6"  # must never appear in any output
API_KEY = "key-5e6f7a8b9c0d1e2f"
NOTE = "note-0a1b2c3d4e5f6a7b"
FLAGS = ("--config", "--secret", "--check-config", "--log-level", "--log-format")
READY = re.compile(r"sink listening on http://[^\s:]+:(\d+)")
SOURCE_READY = re.compile(r"source started, target=(\S+)")

SINK_SCRIPT = """
import asyncio, logging, os, time
from pydantic import SecretStr
import cdk

log = logging.getLogger("test.sink")


class Config(cdk.SinkConfig):
    marker: str
    fail_initialize: bool = False
    slow_initialize: float = 0.0
    slow_destroy: float = 0.0
    api_key: SecretStr | None = None
    note: str = ""  # not typed as a secret, but may still come from secret.yml
    stuck_arrived: bool = False


def mark(path, line):
    with open(path, "a") as f:
        f.write(line + "\\n")


class SyncSink(cdk.Sink):
    def __init__(self):
        if os.environ.get("SLOW_CONSTRUCTOR"):
            log.warning("constructor is slow")
            time.sleep(float(os.environ["SLOW_CONSTRUCTOR"]))

    def initialize(self, config):
        self.config = config
        mark(config.marker, "initialize")
        if config.slow_initialize:
            log.warning("initialize is slow")
            time.sleep(config.slow_initialize)  # blocks the event loop on purpose
        if config.fail_initialize:
            raise RuntimeError("database unreachable")

    def arrived(self, *events):
        for event in events:
            mark(self.config.marker, "arrived " + event.get_id())
        if self.config.stuck_arrived:
            log.warning("arrived is stuck")
            time.sleep(60)  # a worker thread that outlives the shutdown
        return cdk.SUCCESS

    def destroy(self):
        mark(self.config.marker, "destroy")
        if self.config.slow_destroy:
            log.warning("destroy is slow")
            time.sleep(self.config.slow_destroy)  # blocks the event loop on purpose


class AsyncSink(SyncSink):
    async def initialize(self, config):
        await asyncio.sleep(0)
        SyncSink.initialize(self, config)

    async def destroy(self):
        mark(self.config.marker, "destroy")
        if self.config.slow_destroy:
            log.warning("destroy is slow")
            await asyncio.sleep(self.config.slow_destroy)


if os.environ.get("SHUTDOWN_ALLOWANCE"):
    import cdk.runtime

    cdk.runtime.SHUTDOWN_ALLOWANCE = float(os.environ["SHUTDOWN_ALLOWANCE"])
cdk.run_sink(Config, AsyncSink if os.environ.get("ASYNC_HOOKS") else SyncSink)
"""

SOURCE_SCRIPT = """
import asyncio
import cdk


class Config(cdk.SourceConfig):
    marker: str
    count: int = 3
    forever: bool = False
    fail_after: int | None = None


def mark(path, line):
    with open(path, "a") as f:
        f.write(line + "\\n")


class Counter(cdk.Source):
    def initialize(self, config):
        self.config = config
        mark(config.marker, "initialize")

    async def loop_produce_event(self):
        i = 0
        while self.config.forever or i < self.config.count:
            if i == self.config.fail_after:
                raise ValueError("sensor exploded")
            event = cdk.CloudEvent(
                {"id": f"e{i}", "source": "/test", "type": "test.counted", "specversion": "1.0"},
                data={"i": i},
            )
            done = lambda i=i: mark(self.config.marker, f"delivered e{i}")
            await self.chan.put(cdk.Tuple(event, success=done))
            i += 1
            if self.config.forever:
                await asyncio.sleep(0.05)  # pacing: one event every 50 ms

    def destroy(self):
        mark(self.config.marker, "destroy")


cdk.run_source(Config, Counter)
"""


# -- process helpers -------------------------------------------------------------------


class Connector:
    """A connector process; its stderr is collected line by line in the background."""

    def __init__(self, cwd: Path, script: str, *args: str, env: dict[str, str] | None = None):
        (cwd / "main.py").write_text(script, encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "main.py", *args],
            cwd=cwd,
            env=process_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.closed = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """The first stderr line matching ``pattern``; fails when the process exits first."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self._changed:
            while True:
                for line in self.lines[checked:]:
                    match = re.search(pattern, line)
                    if match:
                        return match
                checked = len(self.lines)
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    raise AssertionError(f"no line matching {pattern!r}:\n{self.stderr}")
                self._changed.wait(remaining)

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    @property
    def stdout(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.read()


def process_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    switches = {"ASYNC_HOOKS", "SHUTDOWN_ALLOWANCE", "SLOW_CONSTRUCTOR"}
    names = {name for name, _, _ in ENVIRONMENT} | switches
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["PYTHONPATH"] = str(PROJECT)
    # Running the vendored cdk must not leave __pycache__ inside the template.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra or {})
    return env


def run(cwd: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a connector that is expected to exit by itself."""
    (cwd / "main.py").write_text(script, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "main.py", *args],
        cwd=cwd,
        env=process_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def started() -> Iterator[list[Connector]]:
    """Connectors a test started; any still running at the end are killed."""
    processes: list[Connector] = []
    yield processes
    for process in processes:
        process.kill()


def start(processes: list[Connector], cwd: Path, script: str, *args: str, **env: str) -> Connector:
    connector = Connector(cwd, script, *args, env=env)
    processes.append(connector)
    return connector


def sink_dir(tmp_path: Path, extra: str = "", secret: str = "") -> Path:
    (tmp_path / "config.yml").write_text(
        f"host: 127.0.0.1\nport: 0\nmarker: {tmp_path / 'markers.txt'}\n{extra}", encoding="utf-8"
    )
    if secret:
        (tmp_path / "secret.yml").write_text(secret, encoding="utf-8")
    return tmp_path


def markers(tmp_path: Path) -> list[str]:
    path = tmp_path / "markers.txt"
    return path.read_text().splitlines() if path.exists() else []


def post_event(port: int, event_id: str, token: str | None = None) -> int:
    event = cdk.CloudEvent(
        {"id": event_id, "source": "/test", "type": "test.posted", "specversion": "1.0"},
        data={"hello": "world"},
    )
    headers, body = to_binary(event)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (
            f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{head}\r\n"
        )
        conn.sendall(request.encode() + body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def post_event_ignoring_errors(port: int, event_id: str) -> None:
    """Post an event whose answer may never come (the process is stopped meanwhile)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        post_event(port, event_id)


class Target:
    """A plain HTTP server that records every POST a source makes."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append((headers, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target()
    yield server
    server.close()


def source_dir(tmp_path: Path, target_url: str, extra: str = "") -> Path:
    (tmp_path / "config.yml").write_text(
        f"target: {target_url}\nmarker: {tmp_path / 'markers.txt'}\n{extra}", encoding="utf-8"
    )
    return tmp_path


# -- the command line -----------------------------------------------------------------


@pytest.mark.parametrize("script", [SINK_SCRIPT, SOURCE_SCRIPT], ids=["sink", "source"])
def test_help_lists_every_flag_and_environment_variable(tmp_path: Path, script: str) -> None:
    result = run(tmp_path, script, "--help")
    assert result.returncode == 0
    for flag in FLAGS:
        assert flag in result.stdout
    for name in (
        "CONNECTOR_CONFIG",
        "CONNECTOR_SECRET",
        "CONNECTOR_TARGET",
        "K_SINK",
        "CONNECTOR_PORT",
        "LOG_LEVEL",
        "K_CE_OVERRIDES",
    ):
        assert name in result.stdout
    assert "exit status" in result.stdout


def test_check_config_ok_starts_nothing(tmp_path: Path) -> None:
    sink_dir(tmp_path)
    result = run(tmp_path, SINK_SCRIPT, "--check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["config OK: config.yml"]
    assert markers(tmp_path) == []


def test_check_config_uses_config_flag(tmp_path: Path) -> None:
    sink_dir(tmp_path)
    (tmp_path / "config.yml").rename(tmp_path / "other.yml")
    result = run(tmp_path, SINK_SCRIPT, "--check-config", "--config", "other.yml")
    assert (result.returncode, result.stdout.strip()) == (0, "config OK: other.yml")


def test_check_config_bad_exits_2(tmp_path: Path) -> None:
    sink_dir(tmp_path, "port: 99999\n")
    result = run(tmp_path, SINK_SCRIPT, "--check-config")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "config: port: Input should be less than or equal to 65535"
    ]
    assert markers(tmp_path) == []


def test_bad_config_one_line_per_problem(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text("port: eighty\nlog_level: LOUD\nbogus: 1\n")
    result = run(tmp_path, SINK_SCRIPT)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    fields = sorted(line.split(":")[1].strip() for line in lines)
    assert fields == ["bogus", "log_level", "marker", "port"]
    assert "Traceback" not in result.stderr


def test_missing_config_and_bad_yaml_exit_2(tmp_path: Path) -> None:
    result = run(tmp_path, SINK_SCRIPT)
    assert (result.returncode, result.stderr.strip()) == (2, "config file not found: config.yml")
    (tmp_path / "config.yml").write_text("port: 1\n  marker: [\n")
    result = run(tmp_path, SINK_SCRIPT)
    assert result.returncode == 2
    assert re.fullmatch(r"config file config\.yml is not valid YAML at line 2.*\n", result.stderr)


def test_bad_k_ce_overrides_is_a_config_error(tmp_path: Path) -> None:
    source_dir(tmp_path, "http://127.0.0.1:9/")
    result = run(tmp_path, SOURCE_SCRIPT, K_CE_OVERRIDES="{not json")
    assert result.returncode == 2
    assert result.stderr.startswith("K_CE_OVERRIDES: not valid JSON")
    assert len(result.stderr.splitlines()) == 1
    result = run(tmp_path, SOURCE_SCRIPT, "--check-config", K_CE_OVERRIDES='{"extensions": [1]}')
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_bad_command_line_exits_2(tmp_path: Path) -> None:
    result = run(tmp_path, SINK_SCRIPT, "--log-format", "xml")
    assert result.returncode == 2
    assert "--log-format" in result.stderr


# -- lifecycle of a sink process ------------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "hooks"),
    [(signal.SIGTERM, ""), (signal.SIGINT, ""), (signal.SIGTERM, "1"), (signal.SIGINT, "1")],
    ids=["term-sync", "int-sync", "term-async", "int-async"],
)
def test_signal_shuts_down_cleanly(
    tmp_path: Path, started: list[Connector], sig: signal.Signals, hooks: str
) -> None:
    sink = start(started, sink_dir(tmp_path), SINK_SCRIPT, ASYNC_HOOKS=hooks)
    port = int(sink.wait_for(READY).group(1))
    assert post_event(port, "ev-1") == 200
    sink.send(sig)
    assert sink.wait() == 0, sink.stderr
    assert markers(tmp_path) == ["initialize", "arrived ev-1", "destroy"]
    assert f"received {sig.name}, shutting down" in sink.stderr
    assert "sink stopped" in sink.stderr
    assert "Traceback" not in sink.stderr


@pytest.mark.parametrize("hooks", ["", "1"], ids=["sync-destroy", "async-destroy"])
def test_second_signal_forces_exit(tmp_path: Path, started: list[Connector], hooks: str) -> None:
    sink = start(started, sink_dir(tmp_path, "slow_destroy: 60\n"), SINK_SCRIPT, ASYNC_HOOKS=hooks)
    sink.wait_for(READY)
    sink.send(signal.SIGTERM)
    sink.wait_for("destroy is slow")
    began = time.monotonic()
    sink.send(signal.SIGINT)
    assert sink.wait(timeout=20) == 1
    assert time.monotonic() - began < 10
    assert "received SIGINT again, stopping now" in sink.stderr
    assert markers(tmp_path) == ["initialize", "destroy"]


def test_signal_during_initialize_stops_after_it(tmp_path: Path, started: list[Connector]) -> None:
    sink = start(started, sink_dir(tmp_path, "slow_initialize: 1.5\n"), SINK_SCRIPT)
    sink.wait_for("initialize is slow")
    sink.send(signal.SIGTERM)
    assert sink.wait() == 0, sink.stderr
    assert markers(tmp_path) == ["initialize", "destroy"]


def test_stuck_sync_arrived_cannot_keep_the_process_alive(
    tmp_path: Path, started: list[Connector]
) -> None:
    # Closing the event loop waits for its worker threads; the watchdog must cover that
    # too, or a plain-def arrived that never returns keeps the pod alive after "stopped".
    config = sink_dir(tmp_path, "stuck_arrived: true\ngrace_period: 0.5\n")
    sink = start(started, config, SINK_SCRIPT, SHUTDOWN_ALLOWANCE="1")
    port = int(sink.wait_for(READY).group(1))
    threading.Thread(target=post_event_ignoring_errors, args=(port, "ev-1"), daemon=True).start()
    sink.wait_for("arrived is stuck")
    sink.send(signal.SIGTERM)
    assert sink.wait(timeout=20) == 1
    assert "sink stopped" in sink.stderr
    assert "shutdown took longer than 1.5 s, stopping now" in sink.stderr
    assert markers(tmp_path) == ["initialize", "arrived ev-1", "destroy"]


def test_validator_raising_a_type_error_exits_2_without_traceback(tmp_path: Path) -> None:
    script = SINK_SCRIPT.replace(
        "    stuck_arrived: bool = False\n",
        "    stuck_arrived: bool = False\n\n"
        "    @pydantic.field_validator('note')\n"
        "    @classmethod\n"
        "    def _note(cls, value):\n"
        "        raise TypeError('note checker broke')\n",
    ).replace("import asyncio,", "import pydantic, asyncio,")
    sink_dir(tmp_path, "note: hello\n")
    result = run(tmp_path, script)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "config: Config rejected the configuration: TypeError: note checker broke"
    ]
    assert markers(tmp_path) == []


def test_signal_after_the_loop_closed_is_harmless() -> None:
    # A SIGTERM while the process exits (loop closed, handlers not yet restored).
    signals = _Signals()

    async def attach() -> None:
        signals.attach()

    loop = asyncio.new_event_loop()
    loop.run_until_complete(attach())
    loop.close()
    signals._handle(signal.SIGTERM, None)
    assert signals.received == "SIGTERM"


def test_signal_while_the_connector_is_constructed_exits_0_without_starting(
    tmp_path: Path, started: list[Connector]
) -> None:
    sink = start(started, sink_dir(tmp_path), SINK_SCRIPT, SLOW_CONSTRUCTOR="1.5")
    sink.wait_for("constructor is slow")
    sink.send(signal.SIGTERM)
    assert sink.wait() == 0, sink.stderr
    assert "received SIGTERM, shutting down" in sink.stderr
    assert "sink listening" not in sink.stderr
    assert markers(tmp_path) == []  # neither initialize nor destroy


def test_config_model_that_does_not_fit_exits_1(tmp_path: Path) -> None:
    script = "import cdk\ncdk.run_sink(cdk.SourceConfig, cdk.Sink)\n"
    result = run(tmp_path, script, "--check-config")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: SourceConfig must extend cdk.SinkConfig"


def test_initialize_raising_exits_1_with_one_line(tmp_path: Path) -> None:
    sink_dir(tmp_path, "fail_initialize: true\n")
    result = run(tmp_path, SINK_SCRIPT)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.endswith("ERROR cdk.sink initialize failed: RuntimeError: database unreachable")
    # destroy runs only for a connector whose initialize returned.
    assert markers(tmp_path) == ["initialize"]


def test_port_in_use_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "config.yml").write_text(
            f"host: 127.0.0.1\nport: {port}\nmarker: {tmp_path / 'markers.txt'}\n"
        )
        result = run(tmp_path, SINK_SCRIPT)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.endswith(f"cannot listen on 127.0.0.1:{port}: Address already in use")
    assert markers(tmp_path) == ["initialize", "destroy"]


def test_json_log_format_is_one_object_per_line(tmp_path: Path, started: list[Connector]) -> None:
    sink = start(started, sink_dir(tmp_path), SINK_SCRIPT, "--log-format", "json")
    sink.wait_for(r'"message":"sink listening on')
    sink.send(signal.SIGTERM)
    assert sink.wait() == 0
    records = [json.loads(line) for line in sink.lines]
    assert len(records) >= 3
    for record in records:
        assert set(record) >= {"time", "level", "logger", "message"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    assert {"message": "sink stopped", "logger": "cdk.sink", "level": "INFO"}.items() <= (
        records[-1].items()
    )


def test_text_log_format(tmp_path: Path, started: list[Connector]) -> None:
    sink = start(started, sink_dir(tmp_path), SINK_SCRIPT)
    line = sink.wait_for(READY).string
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO cdk\.sink sink listening on http://127\.0\.0\.1:\d+",
        line,
    )
    sink.send(signal.SIGTERM)
    assert sink.wait() == 0


def test_secrets_never_logged_even_at_debug(tmp_path: Path, started: list[Connector]) -> None:
    secret = f"auth_token: {TOKEN}\napi_key: {API_KEY}\nnote: {NOTE}\n"
    sink = start(
        started,
        sink_dir(tmp_path, "log_level: ERROR\n", secret),
        SINK_SCRIPT,
        "--log-level",
        "debug",
    )
    port = int(sink.wait_for(READY).group(1))
    assert post_event(port, "no-token") == 401
    assert post_event(port, "with-token", TOKEN) == 200
    sink.send(signal.SIGTERM)
    assert sink.wait() == 0
    output = sink.stderr + sink.stdout
    assert "effective config" in output  # the debug dump did happen...
    assert "DEBUG" in output
    assert TOKEN not in output  # ...with the secrets masked
    assert API_KEY not in output
    assert NOTE not in output  # from secret.yml, though typed as a plain str
    assert markers(tmp_path) == ["initialize", "arrived with-token", "destroy"]


# -- lifecycle of a source process ----------------------------------------------------------


def test_source_delivers_then_exits_when_producer_returns(tmp_path: Path, target: Target) -> None:
    source_dir(tmp_path, target.url, "count: 3\n")
    result = run(tmp_path, SOURCE_SCRIPT, K_CE_OVERRIDES='{"extensions": {"cluster": "east"}}')
    assert result.returncode == 0, result.stderr
    assert f"source started, target={target.url}" in result.stderr
    ids = sorted(headers["ce-id"] for headers, _ in target.requests)
    assert ids == ["e0", "e1", "e2"]
    assert all(headers["ce-cluster"] == "east" for headers, _ in target.requests)
    lines = markers(tmp_path)
    assert lines[0] == "initialize"
    assert sorted(lines[1:-1]) == ["delivered e0", "delivered e1", "delivered e2"]
    assert lines[-1] == "destroy"


def test_source_producer_raising_drains_then_exits_1(tmp_path: Path, target: Target) -> None:
    source_dir(tmp_path, target.url, "count: 10\nfail_after: 2\n")
    result = run(tmp_path, SOURCE_SCRIPT)
    assert result.returncode == 1
    assert "loop_produce_event raised" in result.stderr
    assert "Traceback" in result.stderr and "ValueError: sensor exploded" in result.stderr
    assert sorted(headers["ce-id"] for headers, _ in target.requests) == ["e0", "e1"]
    assert markers(tmp_path)[-1] == "destroy"
    assert markers(tmp_path).count("destroy") == 1


def test_source_sigterm_exits_0(tmp_path: Path, target: Target, started: list[Connector]) -> None:
    source = start(started, source_dir(tmp_path, target.url, "forever: true\n"), SOURCE_SCRIPT)
    assert source.wait_for(SOURCE_READY).group(1) == target.url
    source.send(signal.SIGTERM)
    assert source.wait() == 0, source.stderr
    lines = markers(tmp_path)
    assert (lines[0], lines[-1], lines.count("destroy")) == ("initialize", "destroy", 1)


def test_source_target_password_is_masked(tmp_path: Path, target: Target) -> None:
    url = target.url.replace("http://", f"http://user:{TOKEN}@")
    source_dir(tmp_path, url, "count: 1\nlog_level: DEBUG\n")
    result = run(tmp_path, SOURCE_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert "source started, target=http://user:**********@127.0.0.1" in result.stderr
    assert TOKEN not in result.stderr


# -- the services in-process ------------------------------------------------------------


class RecordingSink(cdk.Sink):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.events: list[cdk.CloudEvent] = []

    async def initialize(self, config: cdk.SinkConfig) -> None:
        self.calls.append("initialize")

    def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
        self.events.extend(events)
        return cdk.SUCCESS

    def destroy(self) -> None:
        self.calls.append("destroy")


class ListSource(cdk.Source):
    def __init__(self, count: int, fail: bool = False) -> None:
        self.count = count
        self.fail = fail
        self.calls: list[str] = []
        self.delivered: list[int] = []

    def initialize(self, config: cdk.SourceConfig) -> None:
        self.calls.append("initialize")

    async def loop_produce_event(self) -> None:
        for i in range(self.count):
            event = cdk.CloudEvent(
                {"id": f"s{i}", "source": "/list", "type": "t", "specversion": "1.0"}, data="x"
            )
            await self.chan.put(cdk.Tuple(event, success=partial(self.delivered.append, i)))
        if self.fail:
            raise RuntimeError("producer broke")

    async def destroy(self) -> None:
        self.calls.append("destroy")


class EchoWebhook(cdk.WebhookSource):
    def make_event(self, request: cdk.Request) -> cdk.CloudEvent:
        return cdk.CloudEvent(
            {"id": "w1", "source": "/hook", "type": "hook", "specversion": "1.0"},
            data=request.body.decode(),
        )


def sink_config(**extra: Any) -> cdk.SinkConfig:
    return cdk.SinkConfig.model_validate({"host": "127.0.0.1", "port": 0, **extra})


def source_config(url: str, **extra: Any) -> cdk.SourceConfig:
    return cdk.SourceConfig.model_validate({"target": url, **extra})


async def fetch(method: str, url: str, **kwargs: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as r:
        return r.status, await r.text()


def test_sink_service_round_trip() -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        service = SinkService(sink, sink_config(auth_token=SecretStr(TOKEN)))
        await service.start()
        base = f"http://127.0.0.1:{service.port}"
        assert await fetch("GET", f"{base}/readyz") == (200, "ready")
        event = cdk.CloudEvent({"id": "a", "source": "/s", "type": "t", "specversion": "1.0"})
        headers, body = to_binary(event)
        status, _ = await fetch("POST", base + "/", headers=headers, data=body)
        assert status == 401
        headers["Authorization"] = f"Bearer {TOKEN}"
        status, _ = await fetch("POST", base + "/", headers=headers, data=body)
        assert status == 200
        await service.stop(grace=1.0)
        await service.stop(grace=1.0)  # a second stop is harmless
        assert [e.get_id() for e in sink.events] == ["a"]
        assert sink.calls == ["initialize", "destroy"]
        with pytest.raises(aiohttp.ClientConnectionError):
            await fetch("GET", f"{base}/healthz")

    asyncio.run(scenario())


def test_sink_service_initialize_failure() -> None:
    class Broken(RecordingSink):
        async def initialize(self, config: cdk.SinkConfig) -> None:
            self.calls.append("initialize")
            raise OSError("disk full")

    async def scenario() -> None:
        sink = Broken()
        with pytest.raises(ServiceError, match=r"^initialize failed: OSError: disk full$"):
            await SinkService(sink, sink_config()).start()
        assert sink.calls == ["initialize"]

    asyncio.run(scenario())


def test_sink_service_port_in_use_destroys_once() -> None:
    async def scenario() -> None:
        first, second = RecordingSink(), RecordingSink()
        running = SinkService(first, sink_config())
        await running.start()
        taken = sink_config(port=running.port)
        with pytest.raises(ServiceError, match=r"cannot listen on 127\.0\.0\.1:\d+: "):
            await SinkService(second, taken).start()
        assert second.calls == ["initialize", "destroy"]
        await running.stop(1.0)

    asyncio.run(scenario())


def test_source_service_delivers_to_sink_service() -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        sink_service = SinkService(sink, sink_config())
        await sink_service.start()
        source = ListSource(5)
        url = f"http://127.0.0.1:{sink_service.port}/"
        service = SourceService(source, source_config(url), overrides={"origin": "test"})
        await service.start()
        assert source.chan.maxsize == 1000
        await asyncio.wait_for(service.wait(), 30)  # returns once the producer is done
        await service.stop(grace=10.0)
        assert service.error is None
        assert sorted(source.delivered) == [0, 1, 2, 3, 4]
        assert sorted(e.get_id() for e in sink.events) == ["s0", "s1", "s2", "s3", "s4"]
        assert {e.get_extension("origin") for e in sink.events} == {"test"}
        assert source.calls == ["initialize", "destroy"]
        await sink_service.stop(1.0)

    asyncio.run(scenario())


def test_source_service_producer_failure_is_recorded() -> None:
    async def scenario() -> None:
        sink_service = SinkService(RecordingSink(), sink_config())
        await sink_service.start()
        source = ListSource(2, fail=True)
        url = f"http://127.0.0.1:{sink_service.port}/"
        service = SourceService(source, source_config(url, queue_size=4))
        await service.start()
        await asyncio.wait_for(service.wait(), 30)
        await service.stop(grace=10.0)
        assert isinstance(service.error, RuntimeError)
        assert sorted(source.delivered) == [0, 1]
        assert source.calls == ["initialize", "destroy"]
        await sink_service.stop(1.0)

    asyncio.run(scenario())


def test_source_service_metrics_port() -> None:
    async def scenario() -> None:
        source = ListSource(0)
        service = SourceService(source, source_config("http://127.0.0.1:9/", metrics_port=0))
        await service.start()
        base = f"http://127.0.0.1:{service.port}"
        status, text = await fetch("GET", f"{base}/metrics")
        assert status == 200 and "cdk_events_delivered" in text
        assert (await fetch("GET", f"{base}/readyz"))[0] == 200
        assert (await fetch("POST", f"{base}/", data=b"{}"))[0] == 405
        await service.wait()
        await service.stop(grace=1.0)
        assert source.calls == ["initialize", "destroy"]

    asyncio.run(scenario())


def test_webhook_source_service_round_trip() -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        sink_service = SinkService(sink, sink_config())
        await sink_service.start()
        config = cdk.WebhookSourceConfig.model_validate(
            {"target": f"http://127.0.0.1:{sink_service.port}/", "host": "127.0.0.1", "port": 0}
        )
        service = SourceService(EchoWebhook(), config)
        await service.start()
        status, text = await fetch("POST", f"http://127.0.0.1:{service.port}/", data=b"hi")
        assert status == 200, text
        assert [e.get_data() for e in sink.events] == ["hi"]
        stop_requested = asyncio.ensure_future(service.wait())
        await service.stop(grace=1.0)
        await asyncio.wait_for(stop_requested, 5)
        await sink_service.stop(1.0)

    asyncio.run(scenario())


def test_webhook_source_needs_a_server_config() -> None:
    async def scenario() -> None:
        service = SourceService(EchoWebhook(), source_config("http://127.0.0.1:9/"))
        with pytest.raises(ServiceError, match="WebhookSourceConfig"):
            await service.start()

    asyncio.run(scenario())


def test_plain_def_producer_is_refused() -> None:
    class Blocking(ListSource):
        def loop_produce_event(self) -> None:  # type: ignore[override]
            pass

    async def scenario() -> None:
        source = Blocking(1)
        with pytest.raises(ServiceError, match="must be an async def"):
            await SourceService(source, source_config("http://127.0.0.1:9/")).start()
        assert source.calls == []

    asyncio.run(scenario())
