"""The standard test suites: contract tests a connector project switches on in a few lines.

A project subclasses :class:`SourceTests` or :class:`SinkTests` in a ``test_*.py`` file
and names its own classes; pytest collects the subclass like any ``Test*`` class::

    class TestExampleSink(SinkTests):
        sink_class = ExampleSink
        config_class = Config
        project_dir = Path(__file__).resolve().parent.parent

The tests check the connector contract, not any particular output, so they keep
meaning something after ``make_event`` or ``arrived`` is rewritten:

- sinks: binary, structured and batched events are accepted; ``arrived`` gets exactly
  what was sent (a batch in one call); invalid events get 400 without reaching
  ``arrived``; a failed ``Result`` becomes the HTTP status; an exception becomes 500;
  ``auth_token``, when set, is required;
- polling sources: events reach a real target as valid CloudEvents with unique ids,
  ``success`` fires for each delivered event and ``failed`` when the target rejects;
- webhook sources: a POST yields events at the target and a 2xx, and a 5xx when
  delivery fails;
- with ``project_dir`` set, ``python cmd/main.py`` itself runs: it serves or delivers,
  stops on SIGTERM with status 0, and a bad config exits 2 with a line naming the field.

Everything runs over real HTTP on 127.0.0.1 and is bounded in time. Override
:meth:`SinkTests.make_event` or :meth:`SourceTests.webhook_request` when the
connector expects particular input, and ``config`` for required settings.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
import yaml
from cloudevents.core.v1.event import CloudEvent

from cdk.config import SinkConfig, SourceConfig, WebhookSourceConfig, deep_merge
from cdk.connector import Result, Sink, Source, Tuple, WebhookSource
from cdk.testing.client import Mode, SinkClient
from cdk.testing.runner import (
    ConnectorProcess,
    Running,
    free_port,
    run_in_thread,
    run_to_exit,
)
from cdk.testing.target import CaptureTarget

__all__ = [
    "SinkRecorder",
    "SinkTests",
    "SourceRecorder",
    "SourceTests",
    "assert_same_events",
    "recording_sink",
    "recording_source",
    "sample_event",
]

#: Modes a sink must accept.
SINK_MODES: tuple[Mode, ...] = ("binary", "structured", "batch")


# -- events --------------------------------------------------------------------------


def sample_event(index: int = 0, *, prefix: str = "cdk-test") -> CloudEvent:
    """A complete CloudEvent with JSON data and an extension, unique per ``index``."""
    stamp = time.time_ns()
    return CloudEvent(
        {
            "id": f"{prefix}-{stamp}-{index}",
            "source": "/cdk/testing",
            "type": "com.example.cdk.test",
            "subject": f"item-{index}",
            "datacontenttype": "application/json",
            "cdktestindex": str(index),
        },
        {"index": index, "text": "héllo wörld", "nested": {"ok": True, "n": [1, 2, 3]}},
    )


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media.endswith("/json") or media.endswith("+json")


def _data(event: CloudEvent) -> Any:
    """The event's data compared by value: JSON bodies parsed, whatever their carrier."""
    data = event.get_data()
    if isinstance(data, (bytes, str)) and _is_json(event.get_datacontenttype()):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            return data
    return data


def _attributes(event: CloudEvent) -> dict[str, Any]:
    attributes = dict(event.get_attributes())
    stamp = attributes.get("time")
    if isinstance(stamp, str):
        attributes["time"] = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return attributes


def assert_same_events(got: Sequence[CloudEvent], sent: Sequence[CloudEvent]) -> None:
    """Assert ``got`` holds the events of ``sent``, in order: every attribute and the data."""
    assert len(got) == len(sent), f"expected {len(sent)} event(s), got {len(got)}"
    for index, (actual, expected) in enumerate(zip(got, sent, strict=True)):
        assert _attributes(actual) == _attributes(expected), f"attributes of event {index}"
        assert _data(actual) == _data(expected), f"data of event {index}"


# -- recorders -----------------------------------------------------------------------


class _Waitable:
    """A lock and a condition: record from any thread, wait in the test's thread."""

    def __init__(self) -> None:
        self._changed = threading.Condition()

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
                self._changed.wait(remaining)


class SinkRecorder(_Waitable):
    """What a recording sink's ``arrived`` was called with, one tuple of events per call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[CloudEvent, ...]] = []

    def record(self, events: tuple[CloudEvent, ...]) -> None:
        with self._changed:
            self.calls.append(events)
            self._changed.notify_all()

    def clear(self) -> None:
        with self._changed:
            self.calls.clear()


def recording_sink(sink_class: type[Sink[Any]], recorder: SinkRecorder) -> type[Sink[Any]]:
    """A subclass of ``sink_class`` whose ``arrived`` records its events, then runs the original.

    It keeps the original's kind (``async def`` or plain ``def``), so the runtime runs it
    exactly as it runs the user's sink.
    """
    if inspect.iscoroutinefunction(sink_class.arrived):

        class AsyncRecording(sink_class):  # type: ignore[valid-type, misc]
            async def arrived(self, *events: CloudEvent) -> Result:
                recorder.record(events)
                result: Result = await super().arrived(*events)
                return result

        return AsyncRecording

    class Recording(sink_class):  # type: ignore[valid-type, misc]
        def arrived(self, *events: CloudEvent) -> Result:
            recorder.record(events)
            result: Result = super().arrived(*events)
            return result

    return Recording


def failing_sink(sink_class: type[Sink[Any]], answer: Result | BaseException) -> type[Sink[Any]]:
    """A subclass of ``sink_class`` whose ``arrived`` returns ``answer`` (or raises it)."""

    class Failing(sink_class):  # type: ignore[valid-type, misc]
        def arrived(self, *events: CloudEvent) -> Result:
            if isinstance(answer, BaseException):
                raise answer
            return answer

    return Failing


@dataclass
class _Fate:
    event: CloudEvent
    successes: int = 0
    failures: list[BaseException] = field(default_factory=list)

    @property
    def settled(self) -> bool:
        """A callback fired: the event was delivered or given up on."""
        return self.successes > 0 or bool(self.failures)


class SourceRecorder(_Waitable):
    """Every event a source queued, and how its callbacks fired."""

    def __init__(self) -> None:
        super().__init__()
        self.fates: list[_Fate] = []
        self.finished = False

    def wrap(self, item: Tuple) -> Tuple:
        fate = _Fate(item.event)
        with self._changed:
            self.fates.append(fate)

        def success() -> Any:
            with self._changed:
                fate.successes += 1
                self._changed.notify_all()
            return item.success() if item.success is not None else None

        def failed(error: BaseException) -> Any:
            with self._changed:
                fate.failures.append(error)
                self._changed.notify_all()
            return item.failed(error) if item.failed is not None else None

        return Tuple(item.event, success, failed)

    def finish(self) -> None:
        with self._changed:
            self.finished = True
            self._changed.notify_all()

    def snapshot(self) -> list[_Fate]:
        with self._changed:
            return [_Fate(f.event, f.successes, list(f.failures)) for f in self.fates]


class _RecordingChan:
    """Stands in for ``Source.chan``: wraps each queued Tuple, delegates everything else."""

    def __init__(self, queue: Any, recorder: SourceRecorder) -> None:
        self._queue = queue
        self._recorder = recorder

    async def put(self, item: Tuple) -> None:
        await self._queue.put(self._recorder.wrap(item))

    def put_nowait(self, item: Tuple) -> None:
        self._queue.put_nowait(self._recorder.wrap(item))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


def recording_source(
    source_class: type[Source[Any]], recorder: SourceRecorder
) -> type[Source[Any]]:
    """A subclass of ``source_class`` whose ``chan`` records each Tuple and its callbacks."""

    class Recording(source_class):  # type: ignore[valid-type, misc]
        @property
        def chan(self) -> Any:
            return self.__dict__["_cdk_testing_chan"]

        @chan.setter
        def chan(self, queue: Any) -> None:
            if not isinstance(queue, _RecordingChan):
                queue = _RecordingChan(queue, recorder)
            self.__dict__["_cdk_testing_chan"] = queue

        async def loop_produce_event(self) -> None:
            try:
                await super().loop_produce_event()
            finally:
                recorder.finish()

    return Recording


# -- shared configuration ------------------------------------------------------------


class _ConnectorTests:
    """What both suites share: settings, config building and the subprocess helpers."""

    __test__ = False

    #: The connector's config model (``internal.config.Config``).
    config_class: ClassVar[type[Any]]
    #: Settings merged over the project's config.yml (required fields, faster intervals).
    config: ClassVar[Mapping[str, Any]] = {}
    #: Settings that would live in secret.yml.
    secret: ClassVar[Mapping[str, Any] | None] = None
    #: The project root (holding cmd/main.py); enables the tests that run the process.
    project_dir: ClassVar[str | Path | None] = None
    #: Upper bound, in seconds, for each wait in these tests.
    timeout: ClassVar[float] = 30.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Subclasses are the user's test classes: collect them unless they opt out.
        if "__test__" not in cls.__dict__:
            cls.__test__ = True

    def file_config(self) -> dict[str, Any]:
        """The project's config.yml (empty without ``project_dir``), less its position store:
        tests never touch the project's state, so each run has a fresh one (and no election)."""
        path = Path(self.project_dir) / "config.yml" if self.project_dir is not None else None
        if path is None or not path.is_file():
            return {}
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        state = ("position_store", "leader_election")
        return {k: v for k, v in data.items() if k not in state} if isinstance(data, dict) else {}

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """config.yml, then ``config``, then ``secret``, then ``overrides``, deep-merged."""
        data = deep_merge(self.file_config(), self.config)
        data = deep_merge(data, self.secret or {})
        return deep_merge(data, overrides)

    def connector_config(self, **overrides: Any) -> Any:
        """The validated config object the in-process tests run the connector with."""
        return self.config_class.model_validate(self.settings(**overrides))

    def _require_project(self) -> Path:
        if self.project_dir is None:
            pytest.skip("set project_dir to run the connector as a process")
        project = Path(self.project_dir)
        if not (project / "cmd" / "main.py").is_file():
            pytest.fail(f"project_dir {project} has no cmd/main.py")
        return project

    def _process_files(self, **overrides: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """config.yml and secret.yml contents for a process run."""
        config = deep_merge(deep_merge(self.file_config(), self.config), overrides)
        secret = dict(self.secret) if self.secret is not None else None
        return config, secret

    def _assert_bad_config_exits_2(self, field_name: str, value: Any) -> None:
        project = self._require_project()
        config, secret = self._process_files(**{field_name: value})
        code, output = run_to_exit(project, config, secret, timeout=self.timeout)
        assert code == 2, f"expected exit status 2 for a bad {field_name}, got {code}:\n{output}"
        assert "Traceback" not in output, f"a bad config must not print a traceback:\n{output}"
        assert any(field_name in line for line in output.splitlines()), (
            f"no line names the field {field_name!r}:\n{output}"
        )


def _token(config: Any) -> str | None:
    secret = getattr(config, "auth_token", None)
    return None if secret is None else str(secret.get_secret_value())


# -- sinks ---------------------------------------------------------------------------


def _invalid_requests() -> list[tuple[str, dict[str, str], bytes]]:
    """Requests that carry no valid CloudEvent, each of which must be answered 400."""
    structured = "application/cloudevents+json"
    batch = "application/cloudevents-batch+json"
    valid = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    without_id = {k: v for k, v in valid.items() if k != "id"}
    return [
        (
            "binary-without-id",
            {
                "Content-Type": "application/json",
                "ce-specversion": "1.0",
                "ce-source": "/s",
                "ce-type": "t",
            },
            b"{}",
        ),
        ("structured-without-id", {"Content-Type": structured}, orjson.dumps(without_id)),
        ("structured-not-json", {"Content-Type": structured}, b"{not json"),
        (
            "structured-bad-specversion",
            {"Content-Type": structured},
            orjson.dumps({**valid, "specversion": "9.9"}),
        ),
        ("batch-with-invalid-event", {"Content-Type": batch}, orjson.dumps([valid, without_id])),
        ("batch-not-an-array", {"Content-Type": batch}, orjson.dumps(valid)),
    ]


_INVALID = _invalid_requests()


class SinkTests(_ConnectorTests):
    """Contract tests for a sink; set ``sink_class`` and ``config_class`` in a subclass."""

    __test__ = False

    sink_class: ClassVar[type[Sink[Any]]]
    config_class: ClassVar[type[Any]] = SinkConfig

    def make_event(self, index: int) -> CloudEvent:
        """An event this sink accepts; override when ``arrived`` expects a particular shape."""
        return sample_event(index)

    @contextmanager
    def serve(self, sink: Sink[Any]) -> Iterator[tuple[SinkClient, Running]]:
        """Serve ``sink`` in-process with this suite's config; yield a client for it."""
        config = self.connector_config()
        with run_in_thread(sink, config, start_timeout=self.timeout) as running:
            yield SinkClient(running.url, token=_token(config), timeout=self.timeout), running

    @contextmanager
    def recorded(self) -> Iterator[tuple[SinkClient, SinkRecorder]]:
        recorder = SinkRecorder()
        with self.serve(recording_sink(self.sink_class, recorder)()) as (client, _):
            yield client, recorder

    @pytest.mark.parametrize("mode", ["binary", "structured"])
    def test_single_event_reaches_arrived(self, mode: Mode) -> None:
        event = self.make_event(0)
        with self.recorded() as (client, recorder):
            reply = client.send(event, mode=mode)
        assert reply.ok, f"{mode} event answered {reply.status}: {reply.text}"
        assert len(recorder.calls) == 1, f"arrived called {len(recorder.calls)} times"
        assert_same_events(recorder.calls[0], [event])

    def test_batch_reaches_arrived_in_one_call(self) -> None:
        events = [self.make_event(index) for index in range(3)]
        with self.recorded() as (client, recorder):
            reply = client.send(*events, mode="batch")
        assert reply.ok, f"batch answered {reply.status}: {reply.text}"
        assert len(recorder.calls) == 1, f"arrived called {len(recorder.calls)} times"
        assert_same_events(recorder.calls[0], events)

    def test_every_mode_in_sequence(self) -> None:
        sent: list[CloudEvent] = []
        with self.recorded() as (client, recorder):
            for index, mode in enumerate(SINK_MODES):
                count = 2 if mode == "batch" else 1
                events = [self.make_event(10 * index + n) for n in range(count)]
                sent.extend(events)
                reply = client.send(*events, mode=mode)
                assert reply.ok, f"{mode} answered {reply.status}: {reply.text}"
        assert_same_events([e for call in recorder.calls for e in call], sent)

    @pytest.mark.parametrize(
        ("headers", "body"), [(h, b) for _, h, b in _INVALID], ids=[n for n, _, _ in _INVALID]
    )
    def test_invalid_event_is_400(self, headers: dict[str, str], body: bytes) -> None:
        with self.recorded() as (client, recorder):
            reply = client.post(body, headers)
        assert reply.status == 400, f"expected 400, got {reply.status}: {reply.text}"
        assert recorder.calls == [], "arrived must not see an invalid request"

    @pytest.mark.parametrize("code", [400, 503])
    def test_failed_result_becomes_status(self, code: int) -> None:
        sink = failing_sink(self.sink_class, Result(code, "refused by the test"))()
        with self.serve(sink) as (client, _):
            reply = client.send(self.make_event(0))
        assert reply.status == code, f"expected {code}, got {reply.status}: {reply.text}"

    def test_exception_in_arrived_is_500_without_traceback(self) -> None:
        sink = failing_sink(self.sink_class, RuntimeError("boom from the test"))()
        with self.serve(sink) as (client, _):
            reply = client.send(self.make_event(0))
        assert reply.status == 500, f"expected 500, got {reply.status}: {reply.text}"
        assert "Traceback" not in reply.text

    def test_auth_token_is_enforced(self) -> None:
        config = self.connector_config(auth_token="cdk-testing-token")
        with run_in_thread(self.sink_class(), config, start_timeout=self.timeout) as running:
            anonymous = SinkClient(running.url, timeout=self.timeout).send(self.make_event(0))
            client = SinkClient(running.url, token="cdk-testing-token", timeout=self.timeout)
            allowed = client.send(self.make_event(1))
        assert anonymous.status == 401, f"no token answered {anonymous.status}"
        assert allowed.ok, f"the right token answered {allowed.status}: {allowed.text}"

    def test_health_endpoints(self) -> None:
        with self.recorded() as (client, _):
            assert client.get("/healthz").status == 200
            assert client.get("/readyz").status == 200
            assert client.get("/metrics").status == 200

    def test_process_serves_and_stops_on_sigterm(self) -> None:
        project = self._require_project()
        config, secret = self._process_files(host="127.0.0.1", port=free_port())
        with ConnectorProcess(project, config, secret, ready_timeout=self.timeout) as process:
            token = _token(self.config_class.model_validate(deep_merge(config, secret or {})))
            client = SinkClient(process.url, token=token, timeout=self.timeout)
            replies = [
                client.send(self.make_event(0), mode="binary"),
                client.send(self.make_event(1), mode="structured"),
                client.send(self.make_event(2), self.make_event(3), mode="batch"),
            ]
            code = process.stop(timeout=self.timeout)
        assert all(r.ok for r in replies), [f"{r.status} {r.text}" for r in replies]
        assert code == 0, f"expected exit status 0 after SIGTERM, got {code}:\n{process.output}"
        assert "Traceback" not in process.output, process.output

    def test_bad_config_exits_2(self) -> None:
        self._assert_bad_config_exits_2("port", "not-a-port")


# -- sources -------------------------------------------------------------------------


@dataclass
class _DeliveryRun:
    captured: list[CloudEvent]
    fates: list[_Fate]


class SourceTests(_ConnectorTests):
    """Contract tests for a source (polling or webhook); set ``source_class`` and ``config_class``.

    Tests for the other style than ``source_class``'s are left out of the subclass.
    """

    __test__ = False

    source_class: ClassVar[type[Source[Any]] | type[WebhookSource[Any]]]
    config_class: ClassVar[type[Any]] = SourceConfig
    #: How many events the polling tests wait for.
    event_count: ClassVar[int] = 3

    _POLLING_ONLY: ClassVar[tuple[str, ...]] = (
        "test_events_reach_target_with_unique_ids",
        "test_success_fires_for_delivered_events",
        "test_failed_fires_when_target_rejects",
        "test_process_delivers_and_stops_on_sigterm",
    )
    _WEBHOOK_ONLY: ClassVar[tuple[str, ...]] = (
        "test_webhook_request_yields_events",
        "test_webhook_delivery_failure_is_an_error_status",
        "test_webhook_process_serves_and_stops_on_sigterm",
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        source_class = cls.__dict__.get("source_class")
        if source_class is None:
            return
        webhook = issubclass(source_class, WebhookSource)
        if webhook and cls.__dict__.get("config_class") is None:
            cls.config_class = WebhookSourceConfig
        # A test that cannot apply to this style is removed, not reported as skipped.
        for name in cls._POLLING_ONLY if webhook else cls._WEBHOOK_ONLY:
            setattr(cls, name, None)

    def webhook_request(self) -> tuple[bytes, dict[str, str]]:
        """Body and headers of a request ``make_event`` turns into events; override as needed."""
        body = orjson.dumps({"message": "hello from the test", "n": 1})
        return body, {"Content-Type": "application/json"}

    def source_config(self, target: str, **overrides: Any) -> Any:
        return self.connector_config(target=target, **overrides)

    # -- polling ---------------------------------------------------------------------

    def _run_polling(
        self, *, fail_status: int | None = None, **overrides: Any
    ) -> tuple[list[CloudEvent], SourceRecorder]:
        """Run the source against a CaptureTarget; return what it captured, and the recorder.

        Without ``fail_status`` the run lasts until ``event_count`` events arrived (or the
        source finished) and each of them got its callback; the events returned are
        those, captured while the source ran normally. With ``fail_status`` the target
        answers every request with it, and the run lasts until a ``failed`` callback.
        """
        recorder = SourceRecorder()
        source_class: type[Source[Any]] = self.source_class  # type: ignore[assignment]
        source = recording_source(source_class, recorder)()
        captured: list[CloudEvent] = []
        with CaptureTarget.in_thread() as target:
            if fail_status is not None:
                target.fail_with(fail_status)
            config = self.source_config(target.url, **overrides)
            with run_in_thread(source, config, start_timeout=self.timeout):
                if fail_status is None:
                    wanted = self.event_count
                    # Callbacks follow the target's answers, and a finishing source says so:
                    # the recorder hears of every step, so wait on it. A source that ran
                    # out of events is done once each queued event got its callback.
                    recorder.wait_until(
                        lambda: (
                            len(target.events) >= wanted
                            or (recorder.finished and all(f.settled for f in recorder.fates))
                        ),
                        self.timeout,
                        f"{wanted} events at the target",
                    )
                    captured = target.events
                    recorder.wait_until(
                        lambda: _all_resolved(recorder.fates, captured),
                        self.timeout,
                        "a callback for every event the target accepted",
                    )
                else:
                    recorder.wait_until(
                        lambda: any(f.failures for f in recorder.fates),
                        self.timeout,
                        "a failed callback",
                    )
        return captured, recorder

    @pytest.fixture(scope="class")
    @classmethod
    def delivery_run(cls) -> _DeliveryRun:
        """One run of the source against a target, shared by the tests that inspect it."""
        captured, recorder = cls()._run_polling()
        return _DeliveryRun(captured, recorder.snapshot())

    def test_events_reach_target_with_unique_ids(self, delivery_run: _DeliveryRun) -> None:
        captured = delivery_run.captured
        assert captured, "the source delivered no event"
        keys = [(e.get_source(), e.get_id()) for e in captured]
        assert len(set(keys)) == len(keys), f"duplicate source/id pairs: {keys}"
        for event in captured:
            assert event.get_specversion() == "1.0"
            assert event.get_id() and event.get_source() and event.get_type()
        produced = {(f.event.get_source(), f.event.get_id()) for f in delivery_run.fates}
        assert set(keys) <= produced, "the target saw events the source never queued"

    def test_success_fires_for_delivered_events(self, delivery_run: _DeliveryRun) -> None:
        by_key = {(f.event.get_source(), f.event.get_id()): f for f in delivery_run.fates}
        for event in delivery_run.captured:
            fate = by_key[(event.get_source(), event.get_id())]
            assert fate.successes == 1, f"success fired {fate.successes} times for {event.get_id()}"
            assert fate.failures == [], f"failed fired for delivered {event.get_id()}"

    def test_failed_fires_when_target_rejects(self) -> None:
        _, recorder = self._run_polling(fail_status=400, send_event_attempts=1)
        fates = recorder.snapshot()
        failed = [f for f in fates if f.failures]
        assert failed, "no failed callback fired"
        for fate in failed:
            assert fate.successes == 0, f"success and failed both fired for {fate.event.get_id()}"
            assert len(fate.failures) == 1, f"failed fired {len(fate.failures)} times"

    def test_process_delivers_and_stops_on_sigterm(self) -> None:
        project = self._require_project()
        with CaptureTarget.in_thread() as target:
            config, secret = self._process_files(target=target.url)
            with ConnectorProcess(project, config, secret, ready_timeout=self.timeout) as process:
                target.wait_until(lambda: len(target.events) >= 1, self.timeout)
                code = process.stop(timeout=self.timeout)
        assert code == 0, f"expected exit status 0 after SIGTERM, got {code}:\n{process.output}"
        assert "Traceback" not in process.output, process.output

    # -- webhook ---------------------------------------------------------------------

    def test_webhook_request_yields_events(self) -> None:
        source: WebhookSource[Any] = self.source_class()  # type: ignore[assignment]
        body, headers = self.webhook_request()
        with CaptureTarget.in_thread() as target:
            config = self.source_config(target.url)
            with run_in_thread(source, config, start_timeout=self.timeout) as running:
                client = SinkClient(running.url, token=_token(config), timeout=self.timeout)
                reply = client.post(body, headers)
            captured = list(target.events)
        assert reply.ok, f"webhook answered {reply.status}: {reply.text}"
        assert captured, "the webhook request produced no event at the target"
        keys = [(e.get_source(), e.get_id()) for e in captured]
        assert len(set(keys)) == len(keys), f"duplicate source/id pairs: {keys}"

    def test_webhook_delivery_failure_is_an_error_status(self) -> None:
        source: WebhookSource[Any] = self.source_class()  # type: ignore[assignment]
        body, headers = self.webhook_request()
        with CaptureTarget.in_thread() as target:
            target.fail_with(400)
            config = self.source_config(target.url, send_event_attempts=1)
            with run_in_thread(source, config, start_timeout=self.timeout) as running:
                client = SinkClient(running.url, token=_token(config), timeout=self.timeout)
                reply = client.post(body, headers)
        # An error status a webhook caller retries on, never a 2xx for a lost event.
        assert reply.status >= 500, f"a failed delivery answered {reply.status}: {reply.text}"

    def test_webhook_process_serves_and_stops_on_sigterm(self) -> None:
        project = self._require_project()
        body, headers = self.webhook_request()
        with CaptureTarget.in_thread() as target:
            config, secret = self._process_files(
                target=target.url, host="127.0.0.1", port=free_port()
            )
            with ConnectorProcess(project, config, secret, ready_timeout=self.timeout) as process:
                token = _token(self.config_class.model_validate(deep_merge(config, secret or {})))
                reply = SinkClient(process.url, token=token, timeout=self.timeout).post(
                    body, headers
                )
                code = process.stop(timeout=self.timeout)
            captured = list(target.events)
        assert reply.ok, f"webhook answered {reply.status}: {reply.text}"
        assert captured, "the webhook request produced no event at the target"
        assert code == 0, f"expected exit status 0 after SIGTERM, got {code}:\n{process.output}"

    # -- both ------------------------------------------------------------------------

    def test_bad_config_exits_2(self) -> None:
        self._assert_bad_config_exits_2("target", "not a url")


def _all_resolved(fates: list[_Fate], captured: Sequence[CloudEvent]) -> bool:
    by_key = {(f.event.get_source(), f.event.get_id()): f for f in fates}
    for event in captured:
        fate = by_key.get((event.get_source(), event.get_id()))
        if fate is None or not fate.settled:
            return False
    return True
