"""Process lifecycle: the command line, logging, signals, and the services that run a connector.

``run_source`` / ``run_sink`` are what ``cmd/main.py`` calls: parse the flags, load and
validate the configuration, set up logging, start the connector, and run it until
SIGTERM or SIGINT. :class:`SinkService` and :class:`SourceService` are that same
lifecycle without the process around it, for the test kit and for embedding.

Lines other programs may wait for (logged at INFO; stable):

- ``sink listening on http://HOST:PORT`` once a sink serves;
- ``source listening on http://HOST:PORT`` once a webhook source serves, or
  ``metrics listening on http://HOST:PORT`` for a polling source's ``metrics_port``;
- ``source started, target=URL`` once a source runs (always its last start-up line);
- ``received SIGTERM, shutting down``, then ``sink stopped`` / ``source stopped``.

Shutdown: the first SIGTERM or SIGINT clears readiness, stops accepting, and lets
in-flight work (requests, queued deliveries) finish within ``grace_period`` seconds;
then ``destroy`` runs. A second signal ends the process at once, and so does a
shutdown still running ``SHUTDOWN_ALLOWANCE`` seconds after the grace period. A signal
that arrives while the connector is being constructed ends the process with status 0
before ``initialize`` runs.

Exit status: 0 after a clean shutdown, 1 for a runtime failure (``initialize``,
``loop_produce_event`` or ``destroy`` raising, a port that cannot be bound, a forced
stop), 2 for a bad configuration or command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

import orjson

from cdk.config import (
    ENVIRONMENT,
    ConfigError,
    ConnectorConfig,
    DeliveryConfig,
    ServerConfig,
    SinkConfig,
    SourceConfig,
    load_config,
    masked_dump,
    redact_url,
    resolve_paths,
)
from cdk.connector import Sink, Source, Tuple, WebhookSource
from cdk.http import HTTPServer, Request, Response
from cdk.metrics import Metrics
from cdk.receiver import Receiver, SinkHandler

if TYPE_CHECKING:
    from cdk.delivery import Deliverer
    from cdk.webhook import WebhookHandler

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "SHUTDOWN_ALLOWANCE",
    "ServiceError",
    "SinkService",
    "SourceService",
    "build_parser",
    "configure_logging",
    "run_sink",
    "run_source",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

#: Seconds a shutdown may run past the grace period (for ``destroy``) before the process
#: stops at once with status 1: a hung ``destroy`` must not keep a pod alive forever.
SHUTDOWN_ALLOWANCE = 10.0

_EXIT_HELP = (
    (EXIT_OK, "clean shutdown after SIGTERM/SIGINT, or --check-config found the config valid"),
    (
        EXIT_FAILURE,
        "runtime failure: initialize/loop_produce_event/destroy raised, the port cannot be"
        " bound, a second signal forced the stop, or the shutdown overran"
        f" grace_period + {SHUTDOWN_ALLOWANCE:g} s",
    ),
    (EXIT_CONFIG, "bad configuration or command line: one line per problem on stderr"),
)

_HELP_WIDTH = 92
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_log = logging.getLogger("cdk.runtime")


class ServiceError(Exception):
    """A connector could not start or run; ``str()`` is one line a user can act on."""


# -- command line ---------------------------------------------------------------------


def _epilog() -> str:
    def entries(rows: Sequence[tuple[object, str]]) -> list[str]:
        width = max(len(str(key)) for key, _ in rows)
        indent = " " * (width + 4)
        return [
            textwrap.fill(
                text,
                width=_HELP_WIDTH,
                initial_indent=f"  {str(key).ljust(width)}  ",
                subsequent_indent=indent,
            )
            for key, text in rows
        ]

    env = [(name, text) for name, _, text in ENVIRONMENT]
    lines = ["environment variables:", *entries(env), "", "exit status:"]
    return "\n".join([*lines, *entries(_EXIT_HELP)])


def _prog() -> str:
    script = sys.argv[0] if sys.argv and sys.argv[0] else "cmd/main.py"
    return f"python {script}" if script.endswith(".py") else os.path.basename(script)


def build_parser(kind: str, name: str = "connector") -> argparse.ArgumentParser:
    """The ``cmd/main.py`` command line of a ``kind`` ("source" or "sink") connector."""
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description=f"Run the {name} CloudEvents {kind} connector until SIGTERM or SIGINT.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="config file (default: $CONNECTOR_CONFIG, else ./config.yml)",
    )
    parser.add_argument(
        "--secret",
        metavar="FILE",
        help="secret file merged over the config (default: $CONNECTOR_SECRET, else"
        " ./secret.yml when it exists)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help='validate the configuration, print "config OK: FILE" and exit 0, or print'
        " each problem and exit 2; starts nothing",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=_LEVELS,
        metavar="LEVEL",
        help="one of DEBUG, INFO, WARNING, ERROR, CRITICAL (overrides `log_level`)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="text lines, or one JSON object per line (overrides `log_format`)",
    )
    return parser


# -- logging --------------------------------------------------------------------------


class TextFormatter(logging.Formatter):
    """``2026-11-26T23:00:00Z INFO cdk.source message``, then any traceback."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, ``exc_info``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
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


def _format_now(level: int, name: str, message: str) -> bytes:
    """A log line formatted like the installed handler would, for use where logging can't."""
    record = logging.LogRecord(name, level, __file__, 0, message, None, None)
    formatter: logging.Formatter = TextFormatter()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _StderrHandler) and handler.formatter is not None:
            formatter = handler.formatter
    return (formatter.format(record) + "\n").encode()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _masked(config: ConnectorConfig) -> str:
    """The effective config as JSON, every secret masked."""
    return orjson.dumps(masked_dump(config), option=orjson.OPT_SORT_KEYS).decode()


# -- the pieces both services share -------------------------------------------------------


async def _call(function: Callable[..., Any], *args: Any) -> Any:
    """Call a hook that may be a plain function or a coroutine function."""
    result = function(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


class _Lifecycle:
    """Runs a connector's ``initialize`` and ``destroy`` exactly once each.

    ``destroy`` runs only after ``initialize`` returned: a connector whose
    ``initialize`` raised cleans up what it made before raising.
    """

    def __init__(
        self, connector: Sink | Source | WebhookSource, config: Any, log: logging.Logger
    ) -> None:
        self.connector = connector
        self.config = config
        self.log = log
        self._started = False
        self._initialized = False
        self._destroyed = False
        self.error: BaseException | None = None

    async def initialize(self) -> None:
        if self._started:
            raise ServiceError("already started: a service runs once")
        self._started = True
        try:
            await _call(self.connector.initialize, self.config)
        except Exception as exc:
            # One readable line at ERROR (by the caller); the traceback only at DEBUG.
            self.log.debug("initialize raised", exc_info=True)
            raise ServiceError(f"initialize failed: {_one_line(exc)}") from exc
        self._initialized = True

    async def destroy(self) -> None:
        if not self._initialized or self._destroyed:
            return
        self._destroyed = True
        try:
            await _call(self.connector.destroy)
        except Exception as exc:
            self.log.exception("destroy raised")
            self.error = self.error or exc


def _server_for(receiver: Receiver, config: ServerConfig) -> HTTPServer:
    return HTTPServer(
        receiver.handle,
        host=config.host,
        port=config.port,
        max_body_bytes=config.max_body_bytes,
        max_header_bytes=config.max_header_bytes,
        read_timeout=config.read_timeout,
        keepalive_timeout=config.keepalive_timeout,
        on_reject=receiver.record_status,
        logger=logging.getLogger("cdk.http"),
    )


async def _listen(server: HTTPServer, host: str, port: int) -> None:
    try:
        await server.start()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ServiceError(f"cannot listen on {host}:{port}: {reason}") from exc


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# -- sink -------------------------------------------------------------------------------


class SinkService:
    """A sink's lifecycle in-process: ``initialize``, serve ``POST /``, drain, ``destroy``."""

    def __init__(self, sink: Sink, config: SinkConfig, metrics: Metrics | None = None) -> None:
        self.sink = sink
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics(sink.name())
        self.log = logging.getLogger("cdk.sink")
        self.receiver: Receiver | None = None
        self.server: HTTPServer | None = None
        #: The first runtime failure (``destroy`` raising), once stopped.
        self.error: BaseException | None = None
        self._lifecycle = _Lifecycle(sink, config, self.log)
        self._stopping: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port the sink listens on (the bound one when ``port`` is 0)."""
        if self.server is None:
            raise RuntimeError("the sink is not started")
        return self.server.port

    async def start(self) -> None:
        """Call ``initialize``, then serve; raises :class:`ServiceError` when either fails."""
        await self._lifecycle.initialize()
        try:
            self.receiver = Receiver(
                SinkHandler(self.sink, self.metrics), self.config, self.metrics
            )
            self.server = _server_for(self.receiver, self.config)
            await _listen(self.server, self.config.host, self.config.port)
        except BaseException:
            self.server = None
            await self._lifecycle.destroy()
            raise
        self.receiver.ready = True
        self.log.info("sink listening on %s", _url(self.config.host, self.server.port))

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, finish in-flight requests within ``grace`` seconds, ``destroy``."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None) -> None:
        grace = self.config.grace_period if grace is None else grace
        if self.receiver is not None:
            self.receiver.ready = False
        if self.server is not None:
            await self.server.close(grace)
        await self._lifecycle.destroy()
        self.error = self._lifecycle.error
        self.log.info("sink stopped")


# -- source -----------------------------------------------------------------------------


async def _metrics_only(request: Request) -> Response:
    return Response(
        405,
        b"this port serves GET /metrics, /healthz and /readyz only\n",
        headers=[("allow", "GET, HEAD")],
    )


def _metrics_server_config(config: SourceConfig, port: int) -> ServerConfig:
    """Server settings for the ``metrics_port`` of a polling source (no auth: read-only)."""
    return ServerConfig.model_validate(
        {
            "host": config.host,
            "port": port,
            "log_level": config.log_level,
            "log_format": config.log_format,
            "grace_period": config.grace_period,
        }
    )


class SourceService:
    """A source's lifecycle in-process: ``initialize``, produce and deliver, drain, ``destroy``.

    A :class:`cdk.Source` gets a ``chan`` and its ``loop_produce_event`` runs as a task;
    a :class:`cdk.WebhookSource` is served over HTTP on ``config.port`` instead. Either
    way a :class:`cdk.delivery.Deliverer` drains the queue towards ``config.target``.
    """

    def __init__(
        self,
        source: Source | WebhookSource,
        config: DeliveryConfig,
        metrics: Metrics | None = None,
        *,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.source = source
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics(source.name())
        self.overrides = overrides
        self.webhook = isinstance(source, WebhookSource)
        self.log = logging.getLogger("cdk.source")
        self.chan: asyncio.Queue[Tuple] | None = None
        self.receiver: Receiver | None = None
        self.server: HTTPServer | None = None
        self.deliverer: Deliverer | None = None
        self.webhook_handler: WebhookHandler | None = None
        #: The first runtime failure (producer, delivery or ``destroy`` raising).
        self.error: BaseException | None = None
        self._lifecycle = _Lifecycle(source, config, self.log)
        self._producing: asyncio.Task[None] | None = None
        self._delivering: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port served: a webhook source's ``port``, else the ``metrics_port``."""
        if self.server is None:
            raise RuntimeError("the source serves no HTTP port (not started, or no metrics_port)")
        return self.server.port

    async def start(self) -> None:
        """Create ``chan``, call ``initialize``, start delivery and production (or serving)."""
        # Imported here so that a sink never loads the HTTP client.
        from cdk.delivery import Deliverer

        if self.webhook and not isinstance(self.config, ServerConfig):
            raise ServiceError(
                "a WebhookSource needs a config model extending cdk.WebhookSourceConfig"
            )
        if isinstance(self.source, Source) and not inspect.iscoroutinefunction(
            self.source.loop_produce_event
        ):
            # A plain def would block the event loop, and with it all delivery.
            raise ServiceError("loop_produce_event must be an async def")
        chan: asyncio.Queue[Tuple] = asyncio.Queue(maxsize=self.config.queue_size)
        self.chan = chan
        if isinstance(self.source, Source):
            self.source.chan = chan
        await self._lifecycle.initialize()
        try:
            self.deliverer = Deliverer(self.config, self.metrics, overrides=self.overrides)
            self._delivering = asyncio.create_task(self._deliver(chan), name="cdk-deliver")
            await self._serve(chan)
        except BaseException:
            await self._abort()
            raise
        if isinstance(self.source, Source):
            self._producing = asyncio.create_task(self._produce(), name="cdk-produce")
        if self.receiver is not None:
            self.receiver.ready = True
        if self.server is not None:
            url = _url(getattr(self.config, "host", "0.0.0.0"), self.server.port)
            what = "source" if self.webhook else "metrics"
            self.log.info("%s listening on %s", what, url)
        self.log.info("source started, target=%s", redact_url(self.config.target))

    async def _serve(self, chan: asyncio.Queue[Tuple]) -> None:
        """Serve the webhook, or the read-only endpoints on ``metrics_port``, if any."""
        if self.webhook:
            from cdk.webhook import WebhookHandler

            assert isinstance(self.source, WebhookSource)  # checked by self.webhook
            assert isinstance(self.config, ServerConfig)  # checked in start()
            server_config: ServerConfig = self.config
            self.webhook_handler = WebhookHandler(self.source, chan, self.metrics)
            self.receiver = Receiver(
                self.webhook_handler, server_config, self.metrics, any_path=True
            )
        elif isinstance(self.config, SourceConfig) and self.config.metrics_port is not None:
            server_config = _metrics_server_config(self.config, self.config.metrics_port)
            self.receiver = Receiver(_metrics_only, server_config, self.metrics)
        else:
            return
        server = _server_for(self.receiver, server_config)
        await _listen(server, server_config.host, server_config.port)
        self.server = server

    async def _produce(self) -> None:
        try:
            await self.source.loop_produce_event()  # type: ignore[union-attr]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.exception(
                "loop_produce_event raised; delivering what is queued, then stopping"
            )
            self._fail(exc)
        else:
            self.log.info("loop_produce_event returned; delivering what is queued, then stopping")

    async def _deliver(self, chan: asyncio.Queue[Tuple]) -> None:
        assert self.deliverer is not None  # set just before the task starts
        try:
            await self.deliverer.run(chan)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.exception("delivery stopped unexpectedly")
            self._fail(exc)
        else:
            if not self._stop_requested.is_set():
                self.log.error("delivery stopped unexpectedly")
                self._fail(RuntimeError("delivery stopped before the source did"))

    def _fail(self, exc: BaseException) -> None:
        self.error = self.error or exc
        self._stop_requested.set()

    async def wait(self) -> None:
        """Return once the producer finished, delivery broke down, or a stop was requested."""
        watched: set[asyncio.Future[Any]] = {
            task for task in (self._producing, self._delivering) if task is not None
        }
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({stop, *watched}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()

    async def stop(self, grace: float | None = None) -> None:
        """Stop producing, deliver what is queued within ``grace`` seconds, ``destroy``."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None) -> None:
        loop = asyncio.get_running_loop()
        grace = self.config.grace_period if grace is None else grace
        deadline = loop.time() + grace

        def remaining() -> float:
            return max(0.0, deadline - loop.time())

        self._stop_requested.set()
        if self.receiver is not None:
            self.receiver.ready = False
        if self.webhook_handler is not None:
            self.webhook_handler.close()
        await self._stop_producer(remaining())
        if self.webhook and self.server is not None and self.deliverer is not None:
            # Both at once: pending webhook requests wait for their deliveries, and the
            # deliverer's deadline falls a little earlier so those requests can still
            # be answered (503 for what was not delivered) before connections close.
            margin = min(1.0, grace / 10)
            await asyncio.gather(
                self.server.close(remaining()),
                self.deliverer.stop(max(0.0, remaining() - margin)),
            )
        elif self.deliverer is not None:
            await self.deliverer.stop(remaining())
        await self._stop_delivery_task()
        if self.server is not None and not self.webhook:
            await self.server.close(min(1.0, remaining()))
        await self._lifecycle.destroy()
        self.error = self.error or self._lifecycle.error
        self.log.info("source stopped")

    async def _stop_producer(self, timeout: float) -> None:
        task = self._producing
        if task is None or task.done():
            return
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=max(timeout, 0.1))
        if not done:
            self.log.warning("loop_produce_event ignores cancellation; leaving it behind")

    async def _stop_delivery_task(self) -> None:
        task = self._delivering
        if task is None or task.done():
            return
        # Deliverer.stop has ended its workers; run() returns right after.
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:
            task.cancel()
            await asyncio.wait({task})

    async def _abort(self) -> None:
        """Undo a start that failed after ``initialize`` returned."""
        if self.server is not None:
            await self.server.close(0)
            self.server = None
        if self.deliverer is not None:
            await self.deliverer.stop(0)
        await self._stop_delivery_task()
        await self._lifecycle.destroy()


# -- the process ------------------------------------------------------------------------


class _Signals:
    """SIGTERM/SIGINT: the first asks for a graceful stop, the second ends the process.

    Plain ``signal.signal`` handlers rather than ``loop.add_signal_handler``: Python runs
    them even while a synchronous ``destroy`` or ``initialize`` blocks the event loop,
    which is exactly when the second signal has to work.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._count = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def attach(self) -> asyncio.Event:
        """Bind to the running loop; the event is set by the first signal (even an early one)."""
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        if self.received is not None:
            self._event.set()
        return self._event

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._count += 1
        name = signal.Signals(signum).name
        if self._count > 1:
            _force_exit(f"received {name} again, stopping now")
        self.received = name
        if self._loop is not None and self._event is not None:
            # The loop may already be closed (a signal while the process exits); there is
            # nothing left to stop then, and raising here would print a traceback.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._first, name)

    def _first(self, name: str) -> None:
        _log.info("received %s, shutting down", name)
        assert self._event is not None  # set by attach()
        self._event.set()


def _force_exit(message: str) -> NoReturn:
    # os.write and os._exit: safe inside a signal handler or a watchdog thread, where the
    # logging module's locks or a half-written stderr buffer may be held.
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        sys.stderr.flush()
    os.write(2, _format_now(logging.ERROR, "cdk.runtime", message))
    os._exit(EXIT_FAILURE)


class _Watchdog:
    """Ends the process when a shutdown overruns its allowance.

    Armed when the shutdown begins and disarmed only once the event loop is closed:
    closing the loop waits for its worker threads, and a plain-``def`` ``arrived`` that
    never returns would otherwise keep the process alive after "sink stopped".
    """

    def __init__(self) -> None:
        self._timer: threading.Timer | None = None

    def arm(self, seconds: float) -> None:
        message = f"shutdown took longer than {seconds:g} s, stopping now"
        self._timer = threading.Timer(seconds, _force_exit, args=(message,))
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def _run_service(
    service: SinkService | SourceService, grace: float, signals: _Signals, watchdog: _Watchdog
) -> int:
    stop_requested = signals.attach()
    try:
        await service.start()
    except ServiceError as exc:
        service.log.error("%s", exc)
        return EXIT_FAILURE
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop_requested.wait())}
    if isinstance(service, SourceService):
        waiters.add(asyncio.ensure_future(service.wait()))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    watchdog.arm(grace + SHUTDOWN_ALLOWANCE)
    await service.stop(grace)
    return EXIT_FAILURE if service.error is not None else EXIT_OK


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop
    except ImportError:
        pass
    else:
        loop_factory = uvloop.new_event_loop
    _log.debug("event loop: %s", "uvloop" if loop_factory else "asyncio")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)


def _check_classes(kind: str, config_cls: type, connector_cls: type) -> None:
    """Catch a config model that does not fit the connector before anything runs."""
    if kind == "sink":
        bases: tuple[type, ...] = (Sink,)
        needed: tuple[type, ...] = (SinkConfig,)
        expected = "cdk.SinkConfig"
    elif issubclass(connector_cls, WebhookSource):
        bases = (WebhookSource,)
        needed, expected = (DeliveryConfig, ServerConfig), "cdk.WebhookSourceConfig"
    else:
        bases = (Source,)
        needed, expected = (SourceConfig,), "cdk.SourceConfig"
    if not issubclass(connector_cls, bases):
        names = " or ".join(f"cdk.{base.__name__}" for base in bases)
        raise TypeError(f"{connector_cls.__name__} must extend {names}")
    if not all(issubclass(config_cls, base) for base in needed):
        raise TypeError(f"{config_cls.__name__} must extend {expected}")


def _load(
    kind: str, config_cls: type[ConnectorConfig], args: argparse.Namespace
) -> tuple[ConnectorConfig, dict[str, Any] | None]:
    config = load_config(config_cls, args.config, args.secret)
    overrides: dict[str, Any] | None = None
    if kind == "source":
        from cdk.delivery import parse_ce_overrides

        try:
            overrides = parse_ce_overrides(os.environ.get("K_CE_OVERRIDES")) or None
        except ValueError as exc:
            raise ConfigError([str(exc)]) from None
    update = {
        key: value
        for key, value in (("log_level", args.log_level), ("log_format", args.log_format))
        if value is not None
    }
    return (config.model_copy(update=update) if update else config), overrides


def _main(
    kind: str, config_cls: type[Any], connector_cls: type[Any], argv: Sequence[str] | None
) -> int:
    args = build_parser(kind, connector_cls.__name__).parse_args(argv)
    try:
        _check_classes(kind, config_cls, connector_cls)
    except TypeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        config, overrides = _load(kind, config_cls, args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"config OK: {resolve_paths(args.config, args.secret)[0]}")
        return EXIT_OK
    configure_logging(config.log_level, config.log_format)
    _log.debug("effective config: %s", _masked(config))
    if overrides:
        _log.debug("K_CE_OVERRIDES extensions: %s", orjson.dumps(overrides).decode())
    signals = _Signals()
    # From here on SIGTERM/SIGINT ask for a clean stop: the connector's constructor
    # may take a while, and a signal meanwhile must not end the process abruptly.
    signals.install()
    try:
        return _run(kind, config, overrides, connector_cls, signals)
    finally:
        signals.uninstall()
        logging.shutdown()


def _run(
    kind: str,
    config: ConnectorConfig,
    overrides: Mapping[str, Any] | None,
    connector_cls: type[Any],
    signals: _Signals,
) -> int:
    service: SinkService | SourceService
    try:
        connector = connector_cls()
        # _check_classes made sure the config model fits the connector kind.
        if kind == "sink":
            service = SinkService(connector, cast(SinkConfig, config))
        else:
            service = SourceService(connector, cast(DeliveryConfig, config), overrides=overrides)
    except Exception as exc:
        _log.debug("constructor raised", exc_info=True)
        _log.error("cannot create %s: %s", connector_cls.__name__, _one_line(exc))
        return EXIT_FAILURE
    if signals.received is not None:
        _log.info("received %s, shutting down", signals.received)
        return EXIT_OK
    watchdog = _Watchdog()
    try:
        return _run_loop(_run_service(service, config.grace_period, signals, watchdog))
    except Exception:
        _log.exception("unexpected failure")
        return EXIT_FAILURE
    finally:
        watchdog.disarm()


def _exit(kind: str, config_cls: type[Any], connector_cls: type[Any], argv: Any) -> NoReturn:
    try:
        code = _main(kind, config_cls, connector_cls, argv)
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers were in place (while importing or loading).
        code = EXIT_FAILURE
    sys.exit(code)


def run_source(
    config_cls: type[DeliveryConfig],
    source_cls: type[Source] | type[WebhookSource],
    argv: Sequence[str] | None = None,
) -> NoReturn:
    """Run a source connector as this process; exits 0, 1 or 2 (see the module docstring)."""
    _exit("source", config_cls, source_cls, argv)


def run_sink(
    config_cls: type[SinkConfig], sink_cls: type[Sink], argv: Sequence[str] | None = None
) -> NoReturn:
    """Run a sink connector as this process; exits 0, 1 or 2 (see the module docstring)."""
    _exit("sink", config_cls, sink_cls, argv)
