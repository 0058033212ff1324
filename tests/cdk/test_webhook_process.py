"""A webhook source as a real process: memory under callers that hang up, shutdown."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from pathlib import Path

import pytest
from processes import (
    WEBHOOK_READY,
    WEBHOOK_SCRIPT,
    HangingTarget,
    Process,
    Target,
    get_status,
    rss_bytes,
    start,
)

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def webhook_dir(tmp_path: Path, target_url: str, extra: str = "") -> Path:
    (tmp_path / "config.yml").write_text(
        f"target: {target_url}\nhost: 127.0.0.1\nport: 0\n{extra}", encoding="utf-8"
    )
    return tmp_path


def post_and_hang_up(port: int, body: bytes, patience: float) -> bytes:
    """POST ``body``, wait at most ``patience`` seconds for the answer, hang up: its first
    line, or b"" when none came in time."""
    head = (
        f"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head + body)
        conn.settimeout(patience)
        with contextlib.suppress(TimeoutError, OSError):
            return conn.recv(1024).split(b"\r\n", 1)[0]
    return b""


# Many empty arrays: the JSON that costs most once decoded (about 21x its size).
NESTED_BODY = b'{"a":[' + b",".join([b"[]"] * (MIB // 3 - 10)) + b"]}"


def test_events_of_callers_gone_stay_inside_max_bytes_in_flight(
    tmp_path: Path, hanging: HangingTarget, started: list[Process]
) -> None:
    # The target never answers; each caller hangs up after 1 s. Their events stay queued
    # for delivery: those must stay counted against the budget, decoded size and all.
    budget = 16 * MIB
    config = webhook_dir(tmp_path, hanging.url, f"max_bytes_in_flight: {budget}\n")
    source = start(started, config, WEBHOOK_SCRIPT)
    port = int(source.wait_for(WEBHOOK_READY).group(1))
    pid = source.process.pid
    before = rss_bytes(pid)
    answers: list[bytes] = []

    def caller() -> None:
        for _ in range(5):
            answers.append(post_and_hang_up(port, NESTED_BODY, patience=1.0))

    callers = [threading.Thread(target=caller) for _ in range(8)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(timeout=60)
    assert len(answers) == 40
    grown = rss_bytes(pid, "VmHWM") - before
    assert grown <= 2 * budget + 64 * MIB, f"RSS grew {grown / MIB:.0f} MiB"
    # The budget was full: new callers were told to come back, not left hanging.
    busy = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert busy, answers
    assert hanging.requested.wait(timeout=10)  # some events were admitted, are being delivered


def test_shutdown_delay_keeps_a_webhook_source_serving_while_readyz_answers_503(
    tmp_path: Path, target: Target, started: list[Process]
) -> None:
    source = start(
        started, webhook_dir(tmp_path, target.url, "shutdown_delay: 3\n"), WEBHOOK_SCRIPT
    )
    port = int(source.wait_for(WEBHOOK_READY).group(1))
    source.send(signal.SIGTERM)
    source.wait_for(r"not ready; serving 3 s more before stopping \(shutdown_delay\)")
    assert get_status(port, "/readyz") == 503
    answers = [post_and_hang_up(port, b'{"n": %d}' % n, patience=10) for n in range(3)]
    assert answers == [b"HTTP/1.1 200 OK"] * 3
    assert source.wait() == 0, source.stderr
    assert len(target.requests) == 3
