"""The process: signals, the watchdog and exit statuses of real connector processes."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from processes import (
    POLL_SCRIPT,
    READY,
    SINK_SCRIPT,
    SOURCE_READY,
    SOURCE_SCRIPT,
    TOKEN,
    HangingTarget,
    Process,
    Target,
    get_status,
    markers,
    post_event,
    post_event_ignoring_errors,
    run,
    sink_dir,
    source_dir,
    start,
)

from cdk.runtime import _Signals

#: Seconds ``docker stop`` waits after SIGTERM before it sends SIGKILL (its default).
DOCKER_STOP_TIMEOUT = 10.0

# -- lifecycle of a sink process ------------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "hooks"),
    [(signal.SIGTERM, ""), (signal.SIGINT, ""), (signal.SIGTERM, "1"), (signal.SIGINT, "1")],
    ids=["term-sync", "int-sync", "term-async", "int-async"],
)
def test_signal_shuts_down_cleanly(
    tmp_path: Path, started: list[Process], sig: signal.Signals, hooks: str
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


def test_shutdown_delay_keeps_a_sink_serving_while_readyz_answers_503(
    tmp_path: Path, started: list[Process]
) -> None:
    sink = start(started, sink_dir(tmp_path, "shutdown_delay: 3\n"), SINK_SCRIPT)
    port = int(sink.wait_for(READY).group(1))
    assert get_status(port, "/readyz") == 200
    sink.send(signal.SIGTERM)
    sink.wait_for(r"not ready; serving 3 s more before stopping \(shutdown_delay\)")
    # Still routed here for a moment on Kubernetes: answered, while readiness says go away.
    assert get_status(port, "/readyz") == 503
    assert [post_event(port, f"late-{n}") for n in range(3)] == [200, 200, 200]
    assert sink.wait() == 0, sink.stderr
    assert markers(tmp_path) == [
        "initialize",
        "arrived late-0",
        "arrived late-1",
        "arrived late-2",
        "destroy",
    ]


@pytest.mark.parametrize("hooks", ["", "1"], ids=["sync-destroy", "async-destroy"])
def test_second_signal_forces_exit(tmp_path: Path, started: list[Process], hooks: str) -> None:
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


def test_signal_during_initialize_stops_after_it(tmp_path: Path, started: list[Process]) -> None:
    sink = start(started, sink_dir(tmp_path, "slow_initialize: 1.5\n"), SINK_SCRIPT)
    sink.wait_for("initialize is slow")
    sink.send(signal.SIGTERM)
    assert sink.wait() == 0, sink.stderr
    assert markers(tmp_path) == ["initialize", "destroy"]


def test_stuck_sync_arrived_cannot_keep_the_process_alive(
    tmp_path: Path, started: list[Process]
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
    tmp_path: Path, started: list[Process]
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


def test_source_sigterm_exits_0(tmp_path: Path, target: Target, started: list[Process]) -> None:
    source = start(started, source_dir(tmp_path, target.url, "forever: true\n"), SOURCE_SCRIPT)
    assert source.wait_for(SOURCE_READY).group(1) == target.url
    source.send(signal.SIGTERM)
    assert source.wait() == 0, source.stderr
    lines = markers(tmp_path)
    assert (lines[0], lines[-1], lines.count("destroy")) == ("initialize", "destroy", 1)


def test_a_stop_while_the_target_is_down_says_what_was_not_delivered_in_one_line(
    tmp_path: Path, started: list[Process]
) -> None:
    with socket.socket() as closed:  # a port nothing listens on: every attempt is refused
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}/"
    extra = "count: 300\nsend_event_attempts: 0\ngrace_period: 1\n"
    source = start(started, source_dir(tmp_path, down, extra), SOURCE_SCRIPT)
    source.wait_for("loop_produce_event returned")  # all 300 queued, retried until delivered
    source.send(signal.SIGTERM)
    assert source.wait() == 0, source.stderr
    undelivered = [line for line in source.lines if "not delivered" in line or "failed" in line]
    assert len(undelivered) == 1, "\n".join(undelivered[:5])
    assert "WARNING cdk.delivery shut down with 300 event(s) not delivered [e" in undelivered[0]
    assert "Connection refused" in undelivered[0]


def test_a_stop_that_leaves_tracked_events_unsent_exits_0_and_the_next_run_sends_them(
    tmp_path: Path, hanging: HangingTarget, target: Target, started: list[Process]
) -> None:
    """SIGTERM while the target hangs: the events a checkpoint tracks and the stop left
    unsent are no gap (the stop was asked for, the position stayed behind them). The
    process exits 0 with one summary line, none per event, and the next run sends them."""
    config = tmp_path / "config.yml"
    settings = f"position_store: {tmp_path / 'positions.db'}\ninterval: 0.01\ngrace_period: 1\n"
    config.write_text(f"target: {hanging.url}\n{settings}", encoding="utf-8")
    source = start(started, tmp_path, POLL_SCRIPT)
    assert hanging.requested.wait(timeout=30)  # n1 is in flight and stays there
    source.send(signal.SIGTERM)
    assert source.wait(timeout=30) == 0, source.stderr
    assert "send event failed" not in source.stderr
    assert "so no event is skipped" not in source.stderr
    assert "a restart resumes from its start" in source.stderr
    assert len([line for line in source.lines if "WARNING" in line and "shut down" in line]) == 1
    config.write_text(f"target: {target.url}\n{settings}", encoding="utf-8")
    again = start(started, tmp_path, POLL_SCRIPT, "--max-events", "2")
    assert again.wait(timeout=30) == 0, again.stderr
    assert [headers["ce-id"] for headers, _ in target.requests] == ["n1", "n2"]


def test_a_source_whose_target_hangs_stops_inside_dockers_stop_timeout(
    tmp_path: Path, hanging: HangingTarget, started: list[Process]
) -> None:
    # docker stop sends SIGKILL 10 s after SIGTERM: the default grace_period must end
    # the stop (exit 0, every event settled) before that.
    source = start(started, source_dir(tmp_path, hanging.url, "forever: true\n"), SOURCE_SCRIPT)
    source.wait_for(SOURCE_READY)
    assert hanging.requested.wait(timeout=30)  # a delivery is stuck in flight
    source.send(signal.SIGTERM)
    began = time.monotonic()
    assert source.wait(timeout=30) == 0, source.stderr
    took = time.monotonic() - began
    assert took < DOCKER_STOP_TIMEOUT, f"stopped after {took:.1f} s"
    assert "source stopped" in source.stderr
    assert "shut down with" in source.stderr  # what was in flight was settled as failed


def test_source_target_password_is_masked(tmp_path: Path, target: Target) -> None:
    url = target.url.replace("http://", f"http://user:{TOKEN}@")
    source_dir(tmp_path, url, "count: 1\nlog_level: DEBUG\n")
    result = run(tmp_path, SOURCE_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert "source started, target=http://user:**********@127.0.0.1" in result.stderr
    assert TOKEN not in result.stderr


def test_a_signal_during_the_final_exit_does_not_kill_the_process(
    tmp_path: Path, target: Target, started: list[Process]
) -> None:
    (tmp_path / "config.yml").write_text(f"target: {target.url}\ninterval: 0\n")
    source = start(started, tmp_path, POLL_SCRIPT, "--max-events", "2", LINGER_AT_EXIT="2")
    source.wait_for("at exit")  # past the kit: the interpreter is shutting down
    source.send(signal.SIGTERM)
    source.send(signal.SIGINT)
    assert source.wait() == 0, source.stderr


def test_an_undeliverable_tracked_event_exits_1_and_a_restart_resumes_at_it(
    tmp_path: Path,
) -> None:
    from cdk.testing import CaptureTarget

    db = tmp_path / "positions.db"
    with CaptureTarget.in_thread() as capture:
        (tmp_path / "config.yml").write_text(
            f"target: {capture.url}\ninterval: 0\nposition_store: {db}\nmax_in_flight: 1\n"
        )
        capture.delay_next(3, 0.0)  # n1..n3 accepted
        capture.reject_next(1, 400)  # n4 refused for good
        result = run(tmp_path, POLL_SCRIPT)
        assert result.returncode == 1, result.stderr
        [line] = [line for line in result.stderr.splitlines() if "ERROR" in line]
        assert line.endswith(
            "stopping so no event is skipped: event n4 (position 4) was not delivered:"
            " target rejected the request with HTTP 400: rejected; a restart resumes from"
            " after position 3"
        )
        first = [e.get_id() for e in capture.events]
        result = run(tmp_path, POLL_SCRIPT, "--max-events", "2")
        assert result.returncode == 0, result.stderr
        second = [e.get_id() for e in capture.events][len(first) :]
    # Events queued behind n4 were still delivered (settled) before the exit; the
    # restart resumes at n4, so nothing is skipped (the rest arrive twice: at-least-once).
    assert first[:3] == ["n1", "n2", "n3"] and "n4" not in first
    assert second == ["n4", "n5"]
