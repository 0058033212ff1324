"""The test kit itself: the sink client, the runners, and the standard suites.

The suites are applied to small connectors defined here (a sync and an async sink, a
polling and a webhook source), both in-process and as ``cmd/main.py`` processes of
throwaway projects; broken connectors show that the suites fail when they should.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import inspect
import shutil
import tempfile
import textwrap
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

import cdk
from cdk.testing import (
    CaptureTarget,
    ConnectorProcess,
    SinkClient,
    SinkTests,
    SourceTests,
    free_port,
    run_in_thread,
    sample_event,
)
from cdk.testing.runner import run_to_exit
from cdk.testing.suite import SourceRecorder, recording_sink, recording_source

TEMPLATE_PROJECT = Path(__file__).resolve().parents[2] / "{{cookiecutter.connector_name}}"

# The connectors under test live in one module that both this test (in-process) and the
# throwaway projects' cmd/main.py (as processes) import.
CONNECTORS = textwrap.dedent(
    '''
    """Small connectors the test kit's own tests run."""

    from __future__ import annotations

    import asyncio
    import itertools

    import cdk


    class ListSink(cdk.Sink):
        """Keeps what arrived; a plain def, so it runs in a worker thread."""

        def __init__(self) -> None:
            self.events: list[cdk.CloudEvent] = []
            self.destroyed = False

        def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
            self.events.extend(events)
            print(f"arrived {len(events)}", flush=True)
            return cdk.SUCCESS

        def destroy(self) -> None:
            self.destroyed = True


    class AsyncSink(cdk.Sink):
        async def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
            await asyncio.sleep(0)
            return cdk.SUCCESS


    class CountingSource(cdk.Source):
        """Emits numbered events quickly, forever (or ``limit`` of them)."""

        limit: int | None = None

        async def loop_produce_event(self) -> None:
            for n in itertools.count():
                if self.limit is not None and n >= self.limit:
                    return
                event = cdk.CloudEvent(
                    {"id": f"n-{n}", "source": "/counting", "type": "test.count"}, {"n": n}
                )
                await self.chan.put(cdk.Tuple(event))
                await asyncio.sleep(0.005)


    class EchoWebhook(cdk.WebhookSource):
        def make_event(self, request: cdk.Request) -> cdk.CloudEvent:
            body = request.json()
            return cdk.CloudEvent(
                {"source": "/echo", "type": "test.echo", "datacontenttype": "application/json"},
                body,
            )
    '''
)

MAIN = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    sys.path[:0] = [{cdk_parent!r}, str(Path(__file__).resolve().parent.parent)]

    import cdk
    from connectors import {cls}

    if __name__ == "__main__":
        cdk.{run}(cdk.{config}, {cls})
    """
)


def _project(root: Path, name: str, cls: str, run: str, config: str) -> Path:
    project = root / name
    (project / "cmd").mkdir(parents=True)
    (project / "connectors.py").write_text(CONNECTORS, encoding="utf-8")
    main = MAIN.format(cdk_parent=str(TEMPLATE_PROJECT), cls=cls, run=run, config=config)
    (project / "cmd" / "main.py").write_text(main, encoding="utf-8")
    return project


def _build_projects() -> tuple[Path, ModuleType]:
    root = Path(tempfile.mkdtemp(prefix="cdk-testing-projects-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    _project(root, "sink", "ListSink", "run_sink", "SinkConfig")
    _project(root, "async-sink", "AsyncSink", "run_sink", "SinkConfig")
    _project(root, "source", "CountingSource", "run_source", "SourceConfig")
    _project(root, "webhook", "EchoWebhook", "run_source", "WebhookSourceConfig")
    spec = importlib.util.spec_from_file_location(
        "cdk_testing_connectors", root / "sink" / "connectors.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return root, module


PROJECTS, connectors = _build_projects()
ListSink: Any = connectors.ListSink  # has .events and .destroyed
AsyncSink: type[cdk.Sink] = connectors.AsyncSink
CountingSource: type[cdk.Source] = connectors.CountingSource
EchoWebhook: type[cdk.WebhookSource] = connectors.EchoWebhook


def sink_config(**values: Any) -> cdk.SinkConfig:
    return cdk.SinkConfig.model_validate({"host": "127.0.0.1", "port": 0, **values})


# -- SinkClient against the real sink service -----------------------------------------


def test_client_sends_every_mode_and_reads_answers() -> None:
    sink = ListSink()
    with run_in_thread(sink, sink_config()) as running:
        assert running.port > 0
        client = SinkClient(running.url)
        events = [sample_event(n) for n in range(4)]
        assert client.send(events[0], mode="binary").status == 200
        assert client.send(events[1], mode="structured").status == 200
        reply = client.send(*events[2:], mode="batch")
        assert reply.ok, reply.text
        invalid = client.post(b"{}", {"Content-Type": "application/cloudevents+json"})
        assert invalid.status == 400
        assert invalid.headers.get("content-type")
        assert client.get("/healthz").status == 200
        assert client.request("PUT", "/", b"x").status == 405
    assert [e.get_id() for e in sink.events] == [e.get_id() for e in events]
    assert sink.events[0].get_extension("cdktestindex") == "0"
    assert sink.destroyed, "leaving run_in_thread must call destroy()"


def test_client_sends_the_token() -> None:
    with run_in_thread(ListSink(), sink_config(auth_token="s3cret-token")) as running:
        assert SinkClient(running.url).send(sample_event()).status == 401
        assert SinkClient(running.url, token="s3cret-token").send(sample_event()).ok


def test_single_modes_carry_exactly_one_event() -> None:
    client = SinkClient("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="exactly one event"):
        client.send(sample_event(0), sample_event(1), mode="binary")


def test_client_sends_every_mode_and_raw_bodies() -> None:
    sink = ListSink()
    with run_in_thread(sink, sink_config()) as running:
        client = SinkClient(running.url)
        replies = [
            client.send(sample_event(0)),
            client.send(sample_event(1), mode="structured"),
            client.send(sample_event(2), sample_event(3), mode="batch"),
            client.send(mode="batch"),
            client.post(b"nope", {"Content-Type": "application/cloudevents+json"}),
        ]
    assert [reply.status for reply in replies] == [200, 200, 200, 202, 400]
    assert len(sink.events) == 4


def test_source_in_thread_delivers_to_a_target() -> None:
    source = CountingSource()
    source.limit = 5  # type: ignore[attr-defined]
    with CaptureTarget.in_thread() as target:
        config = cdk.SourceConfig.model_validate({"target": target.url})
        with run_in_thread(source, config) as running:
            running.call(running.service.wait(), 30)
            target.wait_for_sync(5, timeout=30)
        assert sorted(e.get_id() for e in target.events) == [f"n-{n}" for n in range(5)]


def test_webhook_in_thread_serves_on_loopback() -> None:
    with CaptureTarget.in_thread() as target:
        config = cdk.WebhookSourceConfig.model_validate({"target": target.url, "port": 8080})
        with run_in_thread(EchoWebhook(), config) as running:
            assert running.port not in (0, 8080)
            reply = SinkClient(running.url).post_json({"hello": "world"})
        assert reply.status == 200, reply.text
        assert [e.get_data() for e in target.events] in (
            [{"hello": "world"}],
            [b'{"hello":"world"}'],
        )


def test_process_sink_ready_port_output_and_sigterm() -> None:
    port = free_port()
    seen: list[str] = []
    config = {"host": "127.0.0.1", "port": port}
    with ConnectorProcess(PROJECTS / "sink", config, on_line=seen.append) as process:
        assert process.port == port
        assert process.running
        mark = len(process.lines)
        assert SinkClient(process.url).send(sample_event(), mode="structured").ok
        process.wait_for_line(r"^arrived 1$", timeout=30, start=mark)
        code = process.stop(timeout=30)
    assert code == 0, process.output
    assert not process.running
    assert "arrived 1" in process.output
    assert seen == process.lines


def test_process_secret_file_is_used() -> None:
    config = {"host": "127.0.0.1", "port": free_port()}
    with ConnectorProcess(PROJECTS / "sink", config, {"auth_token": "from-secret"}) as process:
        assert SinkClient(process.url).send(sample_event()).status == 401
        assert SinkClient(process.url, token="from-secret").send(sample_event()).ok
        assert process.stop() == 0
    assert "from-secret" not in process.output


def test_process_bad_config_exit_status_and_output() -> None:
    code, output = run_to_exit(PROJECTS / "sink", {"port": "eighty"}, timeout=30)
    assert code == 2
    assert "port" in output
    assert "Traceback" not in output


def test_process_that_never_gets_ready_reports_its_output() -> None:
    process = ConnectorProcess(PROJECTS / "source", {"target": "nope"}, ready_timeout=30)
    with pytest.raises(TimeoutError, match="exited with status 2"), process:
        pass
    assert process.returncode == 2


def test_process_stop_kills_after_timeout() -> None:
    project = PROJECTS / "stubborn"
    (project / "cmd").mkdir(parents=True, exist_ok=True)
    (project / "cmd" / "main.py").write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('source started', flush=True)\n"
        "while True:\n    time.sleep(1)\n",
        encoding="utf-8",
    )
    with ConnectorProcess(project, {}) as process:
        code = process.stop(timeout=0.5)
    assert code < 0  # killed


# -- recorders -------------------------------------------------------------------------


def test_recording_sink_keeps_the_kind_of_arrived() -> None:
    calls: list[tuple[cdk.CloudEvent, ...]] = []
    assert not inspect.iscoroutinefunction(recording_sink(ListSink(), calls).arrived)
    assert inspect.iscoroutinefunction(recording_sink(AsyncSink(), calls).arrived)
    event = sample_event(7)
    with run_in_thread(recording_sink(AsyncSink(), calls), sink_config()) as running:
        assert SinkClient(running.url).send(event).ok
    assert [[e.get_id() for e in call] for call in calls] == [[event.get_id()]]


def test_recording_source_sees_callbacks_of_each_event() -> None:
    recorder = SourceRecorder()
    source = recording_source(CountingSource(), recorder)
    source.limit = 3  # type: ignore[attr-defined]
    with (
        CaptureTarget.in_thread() as target,
        run_in_thread(source, cdk.SourceConfig.model_validate({"target": target.url})) as running,
    ):
        running.call(running.service.wait(), 30)
        recorder.wait_until(
            lambda: len(recorder.fates) == 3 and all(f.successes for f in recorder.fates),
            30,
            "three successes",
        )
    assert recorder.finished
    assert [f.event.get_id() for f in recorder.fates] == ["n-0", "n-1", "n-2"]


# -- the suites on small connectors -----------------------------------------------------


class TestSuiteOnSyncSink(SinkTests):
    sink_class = ListSink
    project_dir = PROJECTS / "sink"


class TestSuiteOnAsyncSink(SinkTests):
    sink_class = AsyncSink
    project_dir = PROJECTS / "async-sink"


class TestSuiteOnSinkWithToken(SinkTests):
    sink_class = ListSink
    secret: ClassVar[Mapping[str, Any] | None] = {"auth_token": "suite-token"}


class TestSuiteOnPollingSource(SourceTests):
    source_class = CountingSource
    project_dir = PROJECTS / "source"


class TestSuiteOnWebhookSource(SourceTests):
    source_class = EchoWebhook
    project_dir = PROJECTS / "webhook"


def test_suite_classes_themselves_are_not_collected() -> None:
    assert SinkTests.__test__ is False
    assert SourceTests.__test__ is False
    assert TestSuiteOnSyncSink.__test__ is True


def test_source_suite_keeps_only_the_tests_of_its_style() -> None:
    assert TestSuiteOnWebhookSource.test_events_reach_target_with_unique_ids is None
    assert callable(TestSuiteOnWebhookSource.test_webhook_request_yields_events)
    assert TestSuiteOnPollingSource.test_webhook_request_yields_events is None
    assert callable(TestSuiteOnPollingSource.test_events_reach_target_with_unique_ids)


# Broken connectors: the suites must catch them.


class DroppingSink(cdk.Sink):
    """Claims failure for every event: the mode tests must fail."""

    def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
        return cdk.Result(500, "dropped")


class DuplicateIdSource(cdk.Source):
    async def loop_produce_event(self) -> None:
        while True:
            event = cdk.CloudEvent({"id": "same", "source": "/dup", "type": "t"}, None)
            await self.chan.put(cdk.Tuple(event))
            await asyncio.sleep(0.005)


class BrokenWebhook(cdk.WebhookSource):
    def make_event(self, request: cdk.Request) -> None:
        return None


class _DroppingSinkSuite(SinkTests):
    __test__ = False
    sink_class = DroppingSink


class _DuplicateSourceSuite(SourceTests):
    __test__ = False
    source_class = DuplicateIdSource


class _BrokenWebhookSuite(SourceTests):
    __test__ = False
    source_class = BrokenWebhook


def test_sink_suite_fails_on_a_sink_that_fails_everything() -> None:
    suite = _DroppingSinkSuite()
    with pytest.raises(AssertionError, match="answered 500"):
        suite.test_single_event_reaches_arrived("binary")
    with pytest.raises(AssertionError, match="answered 500"):
        suite.test_batch_reaches_arrived_in_one_call()


def test_source_suite_fails_on_duplicate_ids() -> None:
    suite = _DuplicateSourceSuite()
    with pytest.raises(AssertionError, match="duplicate"):
        suite.test_events_reach_target_with_unique_ids(suite._run_polling())


def test_webhook_suite_fails_when_no_event_is_made() -> None:
    suite = _BrokenWebhookSuite()
    with pytest.raises(AssertionError, match="no event"):
        suite.test_webhook_request_yields_events()


def test_no_thread_is_left_running() -> None:
    names = [t.name for t in threading.enumerate() if t.name.startswith("cdk-testing")]
    assert names == []


class _FiniteSourceSuite(SourceTests):
    __test__ = False
    source_class = CountingSource
    event_count = 50
    timeout = 20.0


def test_source_suite_accepts_a_source_that_finishes_early() -> None:
    class TwoEvents(CountingSource):  # type: ignore[valid-type, misc]
        limit = 2

    class Suite(_FiniteSourceSuite):
        __test__ = False
        source_class = TwoEvents

    started = time.monotonic()
    captured = Suite()._run_polling().captured
    assert sorted(e.get_id() for e in captured) == ["n-0", "n-1"]
    assert time.monotonic() - started < 10, "waited for events a finished source never makes"


# Settings and stand-ins: the suites never reach the systems config.yml names.


def test_suite_settings_come_from_the_tests_not_from_config_yml(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text("auth_token: production-token\nport: 9\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "config.yml").write_text("log_level: DEBUG\nport: 7\n")

    class Suite(SinkTests):
        __test__ = False
        sink_class = ListSink
        project_dir = tmp_path
        config: ClassVar[Mapping[str, Any]] = {"port": 8}

    assert Suite().settings() == {"log_level": "DEBUG", "port": 8}
    (tmp_path / "tests" / "config.yml").unlink()
    assert Suite().settings(port=6) == {"port": 6}


class StoreSink(cdk.Sink):
    """Writes into ``store``: a system outside the process, unless a stand-in is given."""

    def __init__(self, store: list[str] | None = None) -> None:
        self.store = store

    def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
        if self.store is None:
            raise ConnectionError("the real store is unreachable")
        self.store.extend(event.get_id() for event in events)
        return cdk.SUCCESS


def test_sink_suite_runs_the_sink_make_sink_returns() -> None:
    written: list[str] = []

    class Suite(SinkTests):
        __test__ = False
        sink_class = StoreSink

        def make_sink(self) -> cdk.Sink:
            return StoreSink(written)

    Suite().test_batch_reaches_arrived_in_one_call()
    Suite().test_failed_result_becomes_status(400)
    Suite().test_auth_token_is_enforced()
    assert len(written) == 4  # 3 in the batch, 1 with the right token


def test_source_suite_runs_the_source_make_source_returns() -> None:
    class Suite(SourceTests):
        __test__ = False
        source_class = CountingSource

        def make_source(self) -> cdk.Source:
            source = CountingSource()
            source.limit = 2  # type: ignore[attr-defined]  # only this instance stops at 2
            return source

    run = Suite()._run_polling()
    assert len(run.captured) == 2


def test_suite_settings_missing_a_required_key_say_where_to_give_it() -> None:
    class Needy(cdk.SinkConfig):
        database_url: str

    class Suite(SinkTests):
        __test__ = False
        sink_class = ListSink
        config_class = Needy

    with pytest.raises(pytest.fail.Exception, match=r"database_url[\s\S]*never read config.yml"):
        Suite().connector_config()
