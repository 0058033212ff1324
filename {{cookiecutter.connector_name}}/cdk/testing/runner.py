"""Runners: a connector in-process on a background event loop (:func:`run_in_thread`, for
synchronous tests that talk to it over loopback HTTP) or as ``python cmd/main.py``
(:class:`ConnectorProcess`); and :func:`wait_on`, how the kit waits for another thread.
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
from typing import Any, TypeVar

import yaml

from cdk.config import ENVIRONMENT, ServerConfig
from cdk.connector import Connector
from cdk.service import Service, service_for

__all__ = ["ConnectorProcess", "LoopThread", "Running", "run_in_thread", "run_to_exit", "wait_on"]

T = TypeVar("T")

#: What the runtime prints once a connector serves (on ``port``) or produces events.
READY_PATTERN = re.compile(
    r"(?:sink|source) listening on https?://(?:[^\s:/]+|\[[^\]]+\]):(?P<port>\d+)|source started"
)


def wait_on(
    changed: threading.Condition,
    predicate: Callable[[], bool],
    timeout: float,
    failure: Callable[[], str],
) -> None:
    """Block until ``predicate()`` holds, checked with ``changed`` held whenever it is notified
    and every 50 ms (for state nobody notifies about); at ``timeout`` raise ``failure()``."""
    deadline = time.monotonic() + timeout
    with changed:
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(failure())
            changed.wait(min(remaining, 0.05))


class LoopThread:
    """An asyncio event loop running in a daemon thread; ``call`` runs a coroutine on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        """Run ``coroutine`` on the loop and wait for its result (or raise its exception)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is left on the loop, stop it and join the thread."""

        async def cancel_rest() -> None:
            rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self.call(cancel_rest(), timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self.loop.close()


class Running(LoopThread):
    """A service run by :func:`run_in_thread`; ``url`` and ``port`` of a sink or webhook source."""

    def __init__(self, service: Service) -> None:
        super().__init__(f"cdk-testing-{service.kind}")
        self.service = service

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def run_in_thread(
    connector: Connector[Any],
    config: Any,
    *,
    grace: float = 5.0,
    start_timeout: float = 30.0,
    **options: Any,
) -> Iterator[Running]:
    """Run ``connector`` with its validated ``config`` (a server on a free 127.0.0.1 port) for
    the ``with`` block; ``options`` go to the service (``dry_run``, ``max_events``,
    ``overrides``). On exit the service drains and calls ``destroy()`` within ``grace`` s."""
    if isinstance(config, ServerConfig):
        config = config.model_copy(update={"host": "127.0.0.1", "port": 0})
    running = Running(service_for(connector, config, **options))
    try:
        running.call(running.service.start(), start_timeout)
    except BaseException:
        running.close()
        raise
    try:
        yield running
    finally:
        try:
            running.call(running.service.stop(grace), grace + 10.0)
        finally:
            running.close()


class ConnectorProcess:
    """``python cmd/main.py`` in ``project_dir`` with ``config`` and ``secret`` written to
    temporary YAML files, ``env`` and none of the kit's environment variables. Its output
    (stdout and stderr) is kept line by line, each also passed to ``on_line``. Entering the
    context starts it and waits for the ready line; leaving it stops it."""

    def __init__(
        self,
        project_dir: str | os.PathLike[str],
        config: Mapping[str, Any],
        secret: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 30.0,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.project_dir = Path(project_dir)
        self.config = dict(config)
        self.secret = None if secret is None else dict(secret)
        self.ready_timeout = ready_timeout
        self.on_line = on_line
        self.returncode: int | None = None
        self._env = dict(env or {})
        self._ready: re.Match[str] | None = None
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> ConnectorProcess:
        """Write the config files and start the process (does not wait for readiness)."""
        if self._process is not None:
            raise RuntimeError("the process was already started")
        self._tmp = tempfile.TemporaryDirectory(prefix="cdk-testing-")
        args = [sys.executable, "cmd/main.py"]
        for option, data in (("config", self.config), ("secret", self.secret)):
            if data is not None:
                path = Path(self._tmp.name) / f"{option}.yml"
                path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
                args += [f"--{option}", str(path)]
        kit_variables = {name for name, _, _ in ENVIRONMENT}
        env = {k: v for k, v in os.environ.items() if k not in kit_variables}
        env.update({"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", **self._env})
        self._process = subprocess.Popen(
            args,
            cwd=self.project_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
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
            self._ready = self.wait_for_line(READY_PATTERN, self.ready_timeout)
        except BaseException:
            self.stop(timeout=10.0)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._process is not None and self.returncode is None

    @property
    def lines(self) -> list[str]:
        """Every line printed so far (stdout and stderr interleaved)."""
        with self._changed:
            return list(self._lines)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_until(
        self, predicate: Callable[[list[str]], bool], timeout: float = 30.0, *, what: str = ""
    ) -> list[str]:
        """Wait until ``predicate(lines)`` holds; return the lines. ``TimeoutError`` (naming
        ``what``, with the output so far) on timeout or when the process exits first."""

        def failure() -> str:
            code = self.returncode
            state = f"exited with status {code}" if code is not None else f"ran {timeout:g} s"
            tail = "\n".join(self._lines[-50:])
            return f"{what or 'condition'} not seen: the connector {state}; output:\n{tail}"

        def done() -> bool:
            return predicate(self._lines) or self.returncode is not None

        with self._changed:
            wait_on(self._changed, done, timeout, failure)
            if not predicate(self._lines):
                raise TimeoutError(failure())
            return list(self._lines)

    def wait_for_line(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0, *, start: int = 0
    ) -> re.Match[str]:
        """Wait until a line (from index ``start``) matches ``pattern``; return the match."""
        regex = re.compile(pattern)

        def seen(lines: list[str]) -> bool:
            return any(map(regex.search, lines[start:]))

        lines = self.wait_until(seen, timeout, what=f"a line matching {regex.pattern!r}")
        return next(match for line in lines[start:] if (match := regex.search(line)))

    @property
    def port(self) -> int:
        """The port a sink (or webhook source) listens on, from its ready line."""
        if self._ready is None or self._ready.group("port") is None:
            raise RuntimeError("this connector announced no port (is it a sink?)")
        return int(self._ready.group("port"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit by itself; return its status. TimeoutError otherwise."""
        if self._reader is not None:
            self._reader.join(timeout)  # it ends once the process exited and its output is read
        if self.returncode is None:
            raise TimeoutError(f"the connector still runs after {timeout:g} s")
        return self.returncode

    def stop(self, signal: int = SIGTERM, timeout: float = 20.0) -> int:
        """Send ``signal`` and wait, killing it after ``timeout``; return the exit status."""
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
