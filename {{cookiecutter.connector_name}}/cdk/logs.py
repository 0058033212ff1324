"""Logging: every record to stderr as a text line or one JSON object, and exceptions as one line.

JSON lines carry ``time``, ``level``, ``logger``, ``message``, the call's ``extra=`` fields
(``event_ids`` among them) and the traceback, if any.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

__all__ = ["LEVELS", "configure_logging", "format_now", "one_line"]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: Attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset({"message", "asctime", "taskName", *logging.makeLogRecord({}).__dict__})


def one_line(error: BaseException) -> str:
    """``Type: message`` on one line; the type alone when the message is empty."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class TextFormatter(logging.Formatter):
    """``2026-11-26T23:00:00Z INFO cdk.source message``, then any traceback."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))


class JSONFormatter(logging.Formatter):
    """One JSON object per line: the record's fields, its ``extra=`` fields, its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry: dict[str, Any] = {
            "time": moment.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so configuring twice replaces it."""


def configure_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` and above to stderr, as text or JSON lines."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


def format_now(level: int, name: str, message: str) -> bytes:
    """A log line formatted like the installed handler would, for use where logging can't."""
    record = logging.LogRecord(name, level, __file__, 0, message, None, None)
    formatter: logging.Formatter = TextFormatter()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _StderrHandler) and handler.formatter is not None:
            formatter = handler.formatter
    return (formatter.format(record) + "\n").encode()
