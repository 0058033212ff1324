"""A child process's output, read line by line in the background, for tests to wait on.

``tests/cdk/processes.py`` (connector scripts) and ``tests/template/image.py`` (a
generated project run as its image would) both keep their process's output this way.
"""

from __future__ import annotations

import re
import threading
import time
from typing import IO


class OutputLines:
    """The lines of ``stream`` (newlines stripped), read by a daemon thread until it ends."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """The first line matching ``pattern``; fails when the stream ends first."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self._changed:
            while True:
                for line in self.lines[checked:]:
                    if match := re.search(pattern, line):
                        return match
                checked = len(self.lines)
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    raise AssertionError(f"no line matching {pattern!r}:\n{self.text}")
                self._changed.wait(remaining)

    def join(self, timeout: float) -> None:
        """Wait until the whole stream was read (the process has exited)."""
        self._reader.join(timeout)
