"""Runners: start a connector for a test, in-process or as the real ``cmd/main.py`` process.

In-process, :func:`run_in_thread` runs the same service the CLI runs (``cdk.service``),
on an event loop in a background thread, so synchronous tests can talk to it over
loopback HTTP. As a process,
:class:`ConnectorProcess` writes a config.yml (and secret.yml) into a temporary
directory, starts ``python cmd/main.py`` in the project directory with the current
interpreter, waits for the runtime's ready line and, on stop, sends SIGTERM and hands
back the exit status and everything the process printed.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from signal import SIGTERM
from types import TracebackType
from typing import Any, TypeVar

import yaml

from cdk.config import ENVIRONMENT, ServerConfig
from cdk.connector import Connector
from cdk.service import Service, service_for
from cdk.testing.target import free_port

__all__ = [
    "READY_PATTERN",
    "ConnectorProcess",
    "LoopThread",
    "Running",
    "free_port",
    "run_in_thread",
    "run_to_exit",
]

T = TypeVar("T")

#: What the runtime prints once a connector serves or produces events.
READY_PATTERN = re.compile(
    r"(?:sink|source) listening on (?P<url>https?://(?P<host>[^\s:/]+|\[[^\]]+\]):(?P<port>\d+))"
    r"|source started"
)


class LoopThread:
    """An asyncio event loop running in a daemon thread; coroutines are run on it by ``call``."""

    def __init__(self, name: str = "cdk-testing-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        """Run ``coroutine`` on the loop and wait for its result (or raise its exception)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def call_soon(self, function: Callable[[], Any]) -> None:
        self.loop.call_soon_threadsafe(function)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is left on the loop, stop it and join the thread."""
        if self.loop.is_closed():
            return

        async def cancel_rest() -> None:
            current = asyncio.current_task()
            rest = [task for task in asyncio.all_tasks() if task is not current]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        if self._thread.is_alive():
            try:
                self.call(cancel_rest(), timeout)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Running:
    """A service started on a :class:`LoopThread`: ``.connector``, and ``.url`` / ``.port``
    on 127.0.0.1 for a sink or a webhook source."""

    def __init__(self, service: Service, loop: LoopThread) -> None:
        self.service = service
        self.loop = loop
        self.connector = service.connector

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        """Run a coroutine on the service's loop (to reach the connector from a test)."""
        return self.loop.call(coroutine, timeout)

    def wait(self, timeout: float = 30.0) -> None:
        """Wait until a source finished by itself (its ``loop_produce_event`` returned)."""
        self.loop.call(self.service.wait(), timeout)


@contextmanager
def run_in_thread(
    connector: Connector[Any],
    config: Any,
    *,
    grace: float = 5.0,
    start_timeout: float = 30.0,
    **options: Any,
) -> Iterator[Running]:
    """Run ``connector`` with ``config`` on a background event loop for the ``with`` block.

    ``config`` is the connector's validated config; a server (sink, webhook source) is
    bound to 127.0.0.1 on a free port, and a source's ``target`` is set by the caller.
    ``options`` go to the service (``dry_run``, ``max_events``, ``overrides``). On exit
    the service drains and calls ``destroy()`` within ``grace`` seconds.
    """
    if isinstance(config, ServerConfig):
        config = config.model_copy(update={"host": "127.0.0.1", "port": 0})
    service = service_for(connector, config, **options)
    loop = LoopThread(f"cdk-testing-{service.kind}")
    try:
        loop.call(service.start(), start_timeout)
    except BaseException:
        loop.close()
        raise
    try:
        yield Running(service, loop)
    finally:
        try:
            loop.call(service.stop(grace), grace + 10.0)
        finally:
            loop.close()


class ConnectorProcess:
    """``python cmd/main.py`` of a connector project, run with a config written for the test.

    ``config`` (and ``secret``, if given) are written as YAML into a temporary directory
    and passed with ``--config`` / ``--secret``. Output (stdout and stderr together) is
    collected line by line; ``on_line`` sees each line as it arrives. Use as a context
    manager: entering starts the process and waits for the ready line, leaving stops
    it (SIGTERM) if it still runs.
    """

    def __init__(
        self,
        project_dir: str | os.PathLike[str],
        config: Mapping[str, Any],
        secret: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 30.0,
        on_line: Callable[[str], None] | None = None,
        python: str | None = None,
    ) -> None:
        self.project_dir = Path(project_dir)
        self.config = dict(config)
        self.secret = None if secret is None else dict(secret)
        self.ready_timeout = ready_timeout
        self.on_line = on_line
        self.python = python or sys.executable
        self.returncode: int | None = None
        self.ready_match: re.Match[str] | None = None
        self._extra_env = dict(env or {})
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> ConnectorProcess:
        """Write the config files and start the process (does not wait for readiness)."""
        if self._process is not None:
            raise RuntimeError("the process was already started")
        self._tmp = tempfile.TemporaryDirectory(prefix="cdk-testing-")
        config_path = Path(self._tmp.name) / "config.yml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False), encoding="utf-8")
        args = [self.python, "cmd/main.py", "--config", str(config_path)]
        if self.secret is not None:
            secret_path = Path(self._tmp.name) / "secret.yml"
            secret_path.write_text(yaml.safe_dump(self.secret, sort_keys=False), "utf-8")
            args += ["--secret", str(secret_path)]
        env = {k: v for k, v in os.environ.items() if k not in {n for n, _, _ in ENVIRONMENT}}
        env.update({"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"})
        env.update(self._extra_env)
        self._process = subprocess.Popen(
            args,
            cwd=self.project_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, name="cdk-testing-output", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for raw in self._process.stdout:
            line = raw.rstrip("\r\n")
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
            if self.on_line is not None:
                try:
                    self.on_line(line)
                except Exception:
                    # Keep draining the pipe: a stalled reader would block the child.
                    self.on_line = None
        self._process.wait()
        with self._changed:
            self.returncode = self._process.returncode
            self._changed.notify_all()

    def __enter__(self) -> ConnectorProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop(timeout=10.0)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the process was not started")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self.returncode is None

    # -- output ------------------------------------------------------------------------

    @property
    def lines(self) -> list[str]:
        """Every line printed so far (stdout and stderr interleaved)."""
        with self._changed:
            return list(self._lines)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0, *, start: int = 0
    ) -> re.Match[str]:
        """Wait until a line (from index ``start``) matches ``pattern``; return the match.

        Raises ``TimeoutError`` (with the output so far) on timeout or when the process
        exits without printing it.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        index = start
        with self._changed:
            while True:
                while index < len(self._lines):
                    match = regex.search(self._lines[index])
                    index += 1
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if self.returncode is not None or remaining <= 0:
                    state = (
                        f"exited with status {self.returncode}"
                        if self.returncode is not None
                        else f"printed nothing matching within {timeout:g} s"
                    )
                    raise TimeoutError(
                        f"{regex.pattern!r} not seen: the connector {state}; output:\n"
                        + "\n".join(self._lines[-50:])
                    )
                self._changed.wait(remaining)

    def wait_until(
        self, predicate: Callable[[list[str]], bool], timeout: float = 30.0
    ) -> list[str]:
        """Wait until ``predicate(lines)`` holds; return the lines. TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self._lines):
                remaining = deadline - time.monotonic()
                if self.returncode is not None or remaining <= 0:
                    raise TimeoutError(
                        "condition not met before the connector "
                        + ("exited" if self.returncode is not None else "timed out")
                        + "; output:\n"
                        + "\n".join(self._lines[-50:])
                    )
                self._changed.wait(remaining)
            return list(self._lines)

    def wait_ready(self, timeout: float | None = None) -> re.Match[str]:
        """Wait for the runtime's ready line; remember it for :attr:`port` / :attr:`url`."""
        self.ready_match = self.wait_for_line(READY_PATTERN, timeout or self.ready_timeout)
        return self.ready_match

    @property
    def port(self) -> int:
        """The port a sink (or webhook source) listens on: from its ready line, else config."""
        if self.ready_match is not None and self.ready_match.group("port"):
            return int(self.ready_match.group("port"))
        if "port" in self.config:
            return int(self.config["port"])
        raise RuntimeError("this connector announced no port (is it a sink?)")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- ending ------------------------------------------------------------------------

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit by itself; return its status. TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.returncode is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the connector still runs after {timeout:g} s")
                self._changed.wait(remaining)
            return self.returncode

    def stop(self, signal: int = SIGTERM, timeout: float = 20.0) -> int:
        """Send ``signal`` (if still running) and wait; kill after ``timeout``. Return the status.

        A process that had to be killed reports ``-SIGKILL``; the output stays in
        :attr:`output`.
        """
        if self._process is None:
            raise RuntimeError("the process was not started")
        try:
            if self.returncode is None and self._process.poll() is None:
                self._process.send_signal(signal)
            try:
                code = self.wait(timeout)
            except TimeoutError:
                self._process.kill()
                code = self.wait(10.0)
        finally:
            if self._reader is not None:
                self._reader.join(10.0)
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
        return code


def run_to_exit(
    project_dir: str | os.PathLike[str],
    config: Mapping[str, Any],
    secret: Mapping[str, Any] | None = None,
    *,
    timeout: float = 30.0,
) -> tuple[int, str]:
    """Run the connector until it exits by itself (a bad config, say): (status, output)."""
    process = ConnectorProcess(project_dir, config, secret).start()
    try:
        process.wait(timeout)
    finally:
        code = process.stop(timeout=10.0)
    return code, process.output
