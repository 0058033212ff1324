"""Connector processes for the process-level tests: scripts, a runner, a plain HTTP target.

Each test writes a tiny connector script into ``tmp_path`` and runs it with the current
interpreter, the template's project directory on ``PYTHONPATH``. Tests synchronise on
the lines the process prints (its ready line, say), never on sleeps.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from output_lines import OutputLines

import cdk
from cdk.codec import to_binary
from cdk.config import ENVIRONMENT

PROJECT = Path(__file__).resolve().parents[2] / "{{cookiecutter.connector_name}}"
TOKEN = "tok-91c0d7a2b3e4f5a6"  # must never appear in any output
API_KEY = "key-5e6f7a8b9c0d1e2f"
NOTE = "note-0a1b2c3d4e5f6a7b"
FLAGS = ("--config", "--secret", "--check-config", "--log-level", "--log-format")
READY = re.compile(r"sink listening on http://[^\s:]+:(\d+)")
WEBHOOK_READY = re.compile(r"source listening on http://[^\s:]+:(\d+)")
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


POLL_SCRIPT = """
import atexit, os, sys, time
import cdk


class Config(cdk.SourceConfig):
    pass


class Numbers(cdk.Source[Config]):
    def make_event(self):
        n = (self.position or 0) + 1
        attributes = {"id": f"n{n}", "source": "/n", "type": "t"}
        if os.environ.get("REPLICA"):  # which replica made it (test_leader_election.py)
            attributes["replica"] = os.environ["REPLICA"]
        return cdk.CloudEvent(attributes, {"n": n}), n


if os.environ.get("LINGER_AT_EXIT"):
    def linger():
        print("at exit", file=sys.stderr, flush=True)
        time.sleep(float(os.environ["LINGER_AT_EXIT"]))  # the interpreter is shutting down
    atexit.register(linger)
cdk.run_source(Config, Numbers)
"""

WEBHOOK_SCRIPT = """
import cdk


class Config(cdk.WebhookSourceConfig):
    pass


class Hook(cdk.WebhookSource[Config]):
    def make_event(self, request):
        # As the generated example does: the JSON body becomes the event's data.
        attributes = {"source": "/hook", "type": "test.hooked"}
        if request.delivery_id:
            attributes["id"] = request.delivery_id
        return cdk.CloudEvent(attributes, data=request.json())


cdk.run_source(Config, Hook)
"""

# -- process helpers -------------------------------------------------------------------


class Process:
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
        assert self.process.stderr is not None
        self._stderr = OutputLines(self.process.stderr)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """The first stderr line matching ``pattern``; fails when the process exits first."""
        return self._stderr.wait_for(pattern, timeout)

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.process.wait(timeout)
        self._stderr.join(timeout)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def lines(self) -> list[str]:
        """The stderr lines so far."""
        return self._stderr.lines

    @property
    def stderr(self) -> str:
        return self._stderr.text

    @property
    def stdout(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.read()


def process_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    switches = {
        "ASYNC_HOOKS",
        "SHUTDOWN_ALLOWANCE",
        "SLOW_CONSTRUCTOR",
        "LINGER_AT_EXIT",
        "REPLICA",
    }
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


def start(processes: list[Process], cwd: Path, script: str, *args: str, **env: str) -> Process:
    connector = Process(cwd, script, *args, env=env)
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


def get_status(port: int, path: str) -> int:
    """The status a ``GET path`` is answered with."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
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


class HangingTarget:
    """A target that takes connections and requests and never answers (until closed)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.connections: list[socket.socket] = []
        self.requested = threading.Event()  # set once a request arrived
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                self.connections.append(conn)
                threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while conn.recv(1 << 16):
                self.requested.set()

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory (``VmRSS``) or its peak so far (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def source_dir(tmp_path: Path, target_url: str, extra: str = "") -> Path:
    (tmp_path / "config.yml").write_text(
        f"target: {target_url}\nmarker: {tmp_path / 'markers.txt'}\n{extra}", encoding="utf-8"
    )
    return tmp_path
