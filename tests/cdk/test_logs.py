"""Logging: text and JSON lines, extra fields, exceptions as one line, secrets never logged."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
from pathlib import Path

from processes import (
    API_KEY,
    NOTE,
    READY,
    SINK_SCRIPT,
    TOKEN,
    Process,
    markers,
    post_event,
    sink_dir,
    start,
)

from cdk.logs import configure_logging, one_line


def test_json_log_format_is_one_object_per_line(tmp_path: Path, started: list[Process]) -> None:
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


def test_text_log_format(tmp_path: Path, started: list[Process]) -> None:
    sink = start(started, sink_dir(tmp_path), SINK_SCRIPT)
    line = sink.wait_for(READY).string
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO cdk\.sink sink listening on http://127\.0\.0\.1:\d+",
        line,
    )
    sink.send(signal.SIGTERM)
    assert sink.wait() == 0


def test_secrets_never_logged_even_at_debug(tmp_path: Path, started: list[Process]) -> None:
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


def test_json_lines_carry_the_extra_fields_of_the_call() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    configure_logging("INFO", "json", stream=stream)
    try:
        logging.getLogger("test.logs").warning(
            "delivery failed for %d event(s)", 2, extra={"event_ids": ["a", "b"], "status": 503}
        )
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    record = json.loads(stream.getvalue())
    assert record["message"] == "delivery failed for 2 event(s)"
    assert record["event_ids"] == ["a", "b"] and record["status"] == 503
    assert "args" not in record and "msg" not in record  # the record's own fields stay out


def test_one_line_names_the_type_and_joins_the_lines() -> None:
    assert one_line(ValueError("bad\n  value")) == "ValueError: bad value"
    assert one_line(TimeoutError()) == "TimeoutError"
