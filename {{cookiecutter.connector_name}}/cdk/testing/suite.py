"""The standard test suites: contract tests a connector project switches on in a few lines.

A project subclasses :class:`SourceTests` or :class:`SinkTests` in a ``test_*.py`` file
(``sink_class = ExampleSink``, ``config_class = Config``, ``project_dir = ...``) and
pytest collects the subclass. The tests check the connector contract (each test's name
says which part), not any particular output, so they keep meaning something after
``make_event`` or ``arrived`` is rewritten. Everything runs over real HTTP on 127.0.0.1,
bounded in time; with ``project_dir`` set, ``python cmd/main.py`` runs too.

The connector runs with the settings the tests give, never with the project's config.yml:
``tests/config.yml`` if there is one, then the ``config`` class variable. A connector that
talks to a system (a database, an API) is tested against a local instance that a pytest
fixture starts, its address given in ``config``, or with a stand-in object handed to it
by overriding ``make_sink()`` / ``make_source()`` (the process tests build the connector
themselves: they need the local instance, or ``project_dir = None`` to skip them).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
import yaml
from cloudevents.core.v1.event import CloudEvent
from pydantic import ValidationError

from cdk.codec import Mode
from cdk.config import SinkConfig, SourceConfig, WebhookSourceConfig, deep_merge
from cdk.connector import Connector, Result, Sink, Source, Tuple, WebhookSource
from cdk.testing.client import Reply, SinkClient
from cdk.testing.runner import ConnectorProcess, run_in_thread, run_to_exit, wait_on
from cdk.testing.target import CaptureTarget, free_port

__all__ = [
    "SinkTests",
    "SourceRecorder",
    "SourceTests",
    "assert_same_events",
    "recording_sink",
    "recording_source",
    "sample_event",
]


#: The settings file of the tests, relative to ``project_dir`` (optional).
TEST_CONFIG = Path("tests") / "config.yml"


def sample_event(index: int = 0) -> CloudEvent:
    """A complete CloudEvent with JSON data and an extension, unique per ``index``."""
    return CloudEvent(
        {
            "id": f"cdk-test-{time.time_ns()}-{index}",
            "source": "/cdk/testing",
            "type": "com.example.cdk.test",
            "subject": f"item-{index}",
            "datacontenttype": "application/json",
            "cdktestindex": str(index),
        },
        {"index": index, "text": "héllo wörld", "nested": {"ok": True, "n": [1, 2, 3]}},
    )


def _data(event: CloudEvent) -> Any:
    """The event's data compared by value: JSON bodies parsed, whatever their carrier."""
    data = event.get_data()
    media = (event.get_datacontenttype() or "/json").split(";", 1)[0].strip().lower()
    if isinstance(data, bytes | str) and media.endswith(("/json", "+json")):
        with suppress(orjson.JSONDecodeError):
            return orjson.loads(data)
    return data


def _attributes(event: CloudEvent) -> dict[str, Any]:
    attributes = dict(event.get_attributes())
    if isinstance(attributes.get("time"), str):
        attributes["time"] = datetime.fromisoformat(attributes["time"].replace("Z", "+00:00"))
    return attributes


def assert_same_events(got: Sequence[CloudEvent], sent: Sequence[CloudEvent]) -> None:
    """Assert ``got`` holds the events of ``sent``, in order: every attribute and the data."""
    assert len(got) == len(sent), f"expected {len(sent)} event(s), got {len(got)}"
    for index, (actual, expected) in enumerate(zip(got, sent, strict=True)):
        assert _attributes(actual) == _attributes(expected), f"attributes of event {index}"
        assert _data(actual) == _data(expected), f"data of event {index}"


def _key(event: CloudEvent) -> tuple[str, str]:
    return event.get_source(), event.get_id()


def _assert_unique(events: Sequence[CloudEvent]) -> None:
    keys = [_key(event) for event in events]
    assert len(set(keys)) == len(keys), f"duplicate source/id pairs: {keys}"


def recording_sink(sink: Sink[Any], calls: list[tuple[CloudEvent, ...]]) -> Sink[Any]:
    """``sink``, its ``arrived`` now appending its events to ``calls`` before running as it
    did; of the same kind (``async def`` or plain ``def``): the runtime runs it alike."""
    original = sink.arrived
    if inspect.iscoroutinefunction(original):

        async def recorded_async(*events: CloudEvent) -> Any:
            calls.append(events)
            return await original(*events)

        sink.arrived = recorded_async  # type: ignore[method-assign]
        return sink

    def recorded(*events: CloudEvent) -> Any:
        calls.append(events)
        return original(*events)

    sink.arrived = recorded  # type: ignore[method-assign]
    return sink


@dataclass
class _Fate:
    event: CloudEvent
    successes: int = 0
    failures: list[BaseException] = field(default_factory=list)

    @property
    def settled(self) -> bool:
        """A callback fired: the event was delivered or given up on."""
        return self.successes > 0 or bool(self.failures)


class SourceRecorder:
    """Stands in for a source's ``chan``: passes each Tuple on to the real queue with
    callbacks that record how they fired, and notes when the source finished."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.queue: Any = None
        self.fates: list[_Fate] = []
        self.finished = False

    async def put(self, item: Tuple) -> None:
        await self.queue.put(self._wrap(item))

    def put_nowait(self, item: Tuple) -> None:
        self.queue.put_nowait(self._wrap(item))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)

    def _wrap(self, item: Tuple) -> Tuple:
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

    def any_failed(self) -> bool:
        return any(fate.failures for fate in self.fates)

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        wait_on(self._changed, predicate, timeout, lambda: f"no {what} within {timeout:g} s")


def recording_source(source: Source[Any], recorder: SourceRecorder) -> Source[Any]:
    """``source``, its ``chan`` now ``recorder`` (it becomes an instance of a subclass)."""

    class Recording(type(source)):  # type: ignore[misc]
        @property
        def chan(self) -> Any:
            return recorder

        @chan.setter
        def chan(self, queue: Any) -> None:
            if queue is not recorder:
                recorder.queue = queue

        async def loop_produce_event(self) -> None:
            try:
                await super().loop_produce_event()
            finally:
                recorder.finish()

    Recording.__name__ = Recording.__qualname__ = type(source).__name__
    source.__class__ = Recording
    return source


class _ConnectorTests:
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

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """``tests/config.yml`` (when the project has one), then ``config``, then
        ``overrides``; never the project's config.yml, so that no test reaches the systems
        it names, and without a position store, so that each run starts afresh."""
        path = Path(self.project_dir) / TEST_CONFIG if self.project_dir is not None else None
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path and path.is_file() else {}
        state = ("position_store", "leader_election")
        data = {k: v for k, v in data.items() if k not in state} if isinstance(data, dict) else {}
        return deep_merge(deep_merge(data, self.config), overrides)

    def connector_config(self, **overrides: Any) -> Any:
        """The validated config of in-process runs: ``settings()``, ``secret``, ``overrides``."""
        data = deep_merge(self.settings(), self.secret or {})
        try:
            return self.config_class.model_validate(deep_merge(data, overrides))
        except ValidationError as exc:
            where = "the `config` class variable or tests/config.yml"
            pytest.fail(f"{exc}\nThe tests never read config.yml: give these in {where}.")

    def client(self, url: str, config: Any) -> SinkClient:
        """A client for ``url`` that sends the ``auth_token`` of ``config``, if it has one."""
        secret = getattr(config, "auth_token", None)
        token = None if secret is None else str(secret.get_secret_value())
        return SinkClient(url, token=token, timeout=self.timeout)

    @contextmanager
    def serve(self, connector: Connector[Any], **overrides: Any) -> Iterator[SinkClient]:
        """Serve ``connector`` in-process with ``connector_config(**overrides)``; yield a client."""
        config = self.connector_config(**overrides)
        with run_in_thread(connector, config, start_timeout=self.timeout) as running:
            yield self.client(running.url, config)

    def _project(self) -> Path:
        if self.project_dir is None:
            pytest.skip("set project_dir to run the connector as a process")
        if not (Path(self.project_dir) / "cmd" / "main.py").is_file():
            pytest.fail(f"project_dir {self.project_dir} has no cmd/main.py")
        return Path(self.project_dir)

    @contextmanager
    def process(self, **overrides: Any) -> Iterator[ConnectorProcess]:
        """``python cmd/main.py`` with ``settings(**overrides)`` and ``secret``, once ready;
        after the block, SIGTERM must stop it with exit status 0 and no traceback."""
        project, config = self._project(), self.settings(**overrides)
        with ConnectorProcess(project, config, self.secret, ready_timeout=self.timeout) as process:
            yield process
            code = process.stop(timeout=self.timeout)
        assert code == 0, f"expected exit status 0 after SIGTERM, got {code}:\n{process.output}"
        assert "Traceback" not in process.output, process.output

    def _assert_bad_config_exits_2(self, name: str, value: Any) -> None:
        config = self.settings(**{name: value})
        code, output = run_to_exit(self._project(), config, self.secret, timeout=self.timeout)
        assert code == 2, f"expected exit status 2 for a bad {name}, got {code}:\n{output}"
        assert "Traceback" not in output, f"a bad config must not print a traceback:\n{output}"
        assert any(name in line for line in output.splitlines()), (
            f"no line names the field {name!r}:\n{output}"
        )


_MODES: tuple[Mode, ...] = ("binary", "structured", "batch")
_STRUCTURED = {"Content-Type": "application/cloudevents+json"}
_BATCH = {"Content-Type": "application/cloudevents-batch+json"}
_VALID = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
_NO_ID = {k: v for k, v in _VALID.items() if k != "id"}
_BINARY_NO_ID = {"Content-Type": "application/json"} | {f"ce-{k}": v for k, v in _NO_ID.items()}
#: Requests that carry no valid CloudEvent, each of which must be answered 400.
_INVALID: dict[str, tuple[dict[str, str], bytes]] = {
    "binary-without-id": (_BINARY_NO_ID, b"{}"),
    "structured-without-id": (_STRUCTURED, orjson.dumps(_NO_ID)),
    "structured-not-json": (_STRUCTURED, b"{not json"),
    "structured-bad-specversion": (_STRUCTURED, orjson.dumps({**_VALID, "specversion": "9.9"})),
    "batch-with-invalid-event": (_BATCH, orjson.dumps([_VALID, _NO_ID])),
    "batch-not-an-array": (_BATCH, orjson.dumps(_VALID)),
}


class SinkTests(_ConnectorTests):
    """Contract tests for a sink; set ``sink_class`` and ``config_class`` in a subclass."""

    __test__ = False

    sink_class: ClassVar[type[Sink[Any]]]
    config_class: ClassVar[type[Any]] = SinkConfig

    def make_event(self, index: int) -> CloudEvent:
        """An event this sink accepts; override when ``arrived`` expects a particular shape."""
        return sample_event(index)

    def make_sink(self) -> Sink[Any]:
        """The sink the in-process tests serve, a new one each time: ``sink_class()``.
        Override it to hand the sink a stand-in for the system it writes to."""
        return self.sink_class()

    @contextmanager
    def recorded(self) -> Iterator[tuple[SinkClient, list[tuple[CloudEvent, ...]]]]:
        """Serve the sink, recording each call of ``arrived``; yield a client and the calls."""
        calls: list[tuple[CloudEvent, ...]] = []
        with self.serve(recording_sink(self.make_sink(), calls)) as client:
            yield client, calls

    def _assert_arrive_in_one_call(self, events: list[CloudEvent], mode: Mode) -> None:
        with self.recorded() as (client, calls):
            reply = client.send(*events, mode=mode)
        assert reply.ok, f"{mode} answered {reply.status}: {reply.text}"
        assert len(calls) == 1, f"arrived called {len(calls)} times"
        assert_same_events(calls[0], events)

    @pytest.mark.parametrize("mode", ["binary", "structured"])
    def test_single_event_reaches_arrived(self, mode: Mode) -> None:
        self._assert_arrive_in_one_call([self.make_event(0)], mode)

    def test_batch_reaches_arrived_in_one_call(self) -> None:
        self._assert_arrive_in_one_call([self.make_event(index) for index in range(3)], "batch")

    def test_every_mode_in_sequence(self) -> None:
        sent: list[CloudEvent] = []
        with self.recorded() as (client, calls):
            for index, mode in enumerate(_MODES):
                count = 2 if mode == "batch" else 1
                events = [self.make_event(10 * index + n) for n in range(count)]
                sent.extend(events)
                reply = client.send(*events, mode=mode)
                assert reply.ok, f"{mode} answered {reply.status}: {reply.text}"
        assert_same_events([event for call in calls for event in call], sent)

    @pytest.mark.parametrize(("headers", "body"), list(_INVALID.values()), ids=list(_INVALID))
    def test_invalid_event_is_400(self, headers: dict[str, str], body: bytes) -> None:
        with self.recorded() as (client, calls):
            reply = client.post(body, headers)
        assert reply.status == 400, f"expected 400, got {reply.status}: {reply.text}"
        assert calls == [], "arrived must not see an invalid request"

    def _answer_to(self, answer: Result | BaseException) -> Reply:
        """What the sink answers when its ``arrived`` returns (or raises) ``answer``."""

        def arrived(*events: CloudEvent) -> Result:
            if isinstance(answer, BaseException):
                raise answer
            return answer

        sink = self.make_sink()
        sink.arrived = arrived  # type: ignore[method-assign]
        with self.serve(sink) as client:
            return client.send(self.make_event(0))

    @pytest.mark.parametrize("code", [400, 503])
    def test_failed_result_becomes_status(self, code: int) -> None:
        reply = self._answer_to(Result(code, "refused by the test"))
        assert reply.status == code, f"expected {code}, got {reply.status}: {reply.text}"

    def test_exception_in_arrived_is_500_without_traceback(self) -> None:
        reply = self._answer_to(RuntimeError("boom from the test"))
        assert reply.status == 500, f"expected 500, got {reply.status}: {reply.text}"
        assert "Traceback" not in reply.text

    def test_auth_token_is_enforced(self) -> None:
        with self.serve(self.make_sink(), auth_token="cdk-testing-token") as client:
            anonymous = SinkClient(client.url, timeout=self.timeout).send(self.make_event(0))
            allowed = client.send(self.make_event(1))
        assert anonymous.status == 401, f"no token answered {anonymous.status}"
        assert allowed.ok, f"the right token answered {allowed.status}: {allowed.text}"

    def test_health_endpoints(self) -> None:
        with self.recorded() as (client, _):
            for path in ("/healthz", "/readyz", "/metrics"):
                assert client.get(path).status == 200, path

    def test_process_serves_and_stops_on_sigterm(self) -> None:
        with self.process(host="127.0.0.1", port=free_port()) as process:
            client = self.client(process.url, self.connector_config())
            replies = [
                client.send(self.make_event(0), mode="binary"),
                client.send(self.make_event(1), mode="structured"),
                client.send(self.make_event(2), self.make_event(3), mode="batch"),
            ]
        assert all(r.ok for r in replies), [f"{r.status} {r.text}" for r in replies]

    def test_bad_config_exits_2(self) -> None:
        self._assert_bad_config_exits_2("port", "not-a-port")


@dataclass
class _DeliveryRun:
    """What the target accepted in one polling run, and the callbacks of each queued event."""

    captured: list[CloudEvent]
    fates: list[_Fate]


class SourceTests(_ConnectorTests):
    """Contract tests for a source; set ``source_class`` and ``config_class`` in a subclass,
    which keeps the tests of its style (polling or webhook) only."""

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

    def make_source(self) -> Source[Any] | WebhookSource[Any]:
        """The source the in-process tests run, a new one each time: ``source_class()``.
        Override it to hand the source a stand-in for the system it reads."""
        return self.source_class()

    def webhook_request(self) -> tuple[bytes, dict[str, str]]:
        """Body and headers of a request ``make_event`` turns into events; override as needed."""
        body = orjson.dumps({"message": "hello from the test", "n": 1})
        return body, {"Content-Type": "application/json"}

    def _run_polling(self, *, fail_status: int | None = None, **overrides: Any) -> _DeliveryRun:
        """Run the source until ``event_count`` events arrived (or it finished) and each got its
        callback; or, with every request answered ``fail_status``, until a ``failed`` callback."""
        recorder = SourceRecorder()
        source = recording_source(self.make_source(), recorder)  # type: ignore[arg-type]
        captured: list[CloudEvent] = []
        with CaptureTarget.in_thread() as target:
            target.fail_with(fail_status)
            config = self.connector_config(target=target.url, **overrides)
            with run_in_thread(source, config, start_timeout=self.timeout):
                if fail_status is None:
                    captured = self._await_delivery(target, recorder)
                else:
                    recorder.wait_until(recorder.any_failed, self.timeout, "failed callback")
        return _DeliveryRun(captured, recorder.fates)

    def _await_delivery(self, target: CaptureTarget, recorder: SourceRecorder) -> list[CloudEvent]:
        # The recorder hears of every callback and of the source finishing: wait on it. A
        # source that ran out of events is done once each queued event got its callback.
        def enough() -> bool:
            done = recorder.finished and all(fate.settled for fate in recorder.fates)
            return done or len(target.events) >= self.event_count

        recorder.wait_until(enough, self.timeout, f"{self.event_count} events at the target")
        captured = target.events

        def settled() -> bool:
            fates = {_key(fate.event): fate for fate in recorder.fates}
            return all(_key(e) in fates and fates[_key(e)].settled for e in captured)

        recorder.wait_until(settled, self.timeout, "callback for every event the target took")
        return captured

    @pytest.fixture(scope="class")
    @classmethod
    def delivery_run(cls) -> _DeliveryRun:
        """One run of the source against a target, shared by the tests that inspect it."""
        return cls()._run_polling()

    def test_events_reach_target_with_unique_ids(self, delivery_run: _DeliveryRun) -> None:
        captured = delivery_run.captured
        assert captured, "the source delivered no event"
        _assert_unique(captured)
        for event in captured:
            assert event.get_specversion() == "1.0"
            assert event.get_id() and event.get_source() and event.get_type()
        produced = {_key(fate.event) for fate in delivery_run.fates}
        assert {_key(e) for e in captured} <= produced, "the target saw events never queued"

    def test_success_fires_for_delivered_events(self, delivery_run: _DeliveryRun) -> None:
        fates = {_key(fate.event): fate for fate in delivery_run.fates}
        for event in delivery_run.captured:
            fate = fates[_key(event)]
            assert fate.successes == 1, f"success fired {fate.successes} times for {event.get_id()}"
            assert fate.failures == [], f"failed fired for delivered {event.get_id()}"

    def test_failed_fires_when_target_rejects(self) -> None:
        run = self._run_polling(fail_status=400, send_event_attempts=1)
        failed = [fate for fate in run.fates if fate.failures]
        assert failed, "no failed callback fired"
        for fate in failed:
            assert fate.successes == 0, f"success and failed both fired for {fate.event.get_id()}"
            assert len(fate.failures) == 1, f"failed fired {len(fate.failures)} times"

    def test_process_delivers_and_stops_on_sigterm(self) -> None:
        with CaptureTarget.in_thread() as target, self.process(target=target.url):
            target.wait_until(lambda: len(target.events) >= 1, self.timeout)

    def _post_webhook(
        self, fail_status: int | None = None, **overrides: Any
    ) -> tuple[Reply, list[CloudEvent]]:
        """POST ``webhook_request()`` once to the source served in-process: (reply, events)."""
        body, headers = self.webhook_request()
        with CaptureTarget.in_thread() as target:
            target.fail_with(fail_status)
            with self.serve(self.make_source(), target=target.url, **overrides) as client:
                reply = client.post(body, headers)
            return reply, target.events

    def test_webhook_request_yields_events(self) -> None:
        reply, captured = self._post_webhook()
        assert reply.ok, f"webhook answered {reply.status}: {reply.text}"
        assert captured, "the webhook request produced no event at the target"
        _assert_unique(captured)

    def test_webhook_delivery_failure_is_an_error_status(self) -> None:
        reply, _ = self._post_webhook(fail_status=400, send_event_attempts=1)
        # An error status a webhook caller retries on, never a 2xx for a lost event.
        assert reply.status >= 500, f"a failed delivery answered {reply.status}: {reply.text}"

    def test_webhook_process_serves_and_stops_on_sigterm(self) -> None:
        body, headers = self.webhook_request()
        with CaptureTarget.in_thread() as target:
            with self.process(target=target.url, host="127.0.0.1", port=free_port()) as process:
                config = self.connector_config(target=target.url)
                reply = self.client(process.url, config).post(body, headers)
            captured = target.events
        assert reply.ok, f"webhook answered {reply.status}: {reply.text}"
        assert captured, "the webhook request produced no event at the target"

    def test_bad_config_exits_2(self) -> None:
        self._assert_bad_config_exits_2("target", "not a url")
