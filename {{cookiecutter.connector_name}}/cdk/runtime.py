"""The process: ``run_source`` / ``run_sink``, signals, the shutdown watchdog, exit statuses.

The first SIGTERM or SIGINT asks the service (``cdk.service``) to stop within
``grace_period``; a second one, or a stop running ``SHUTDOWN_ALLOWANCE`` seconds past it,
ends the process at once with status 1. From the start of ``run_source`` to the last
instruction, a signal never kills the process by its default action.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from types import FrameType
from typing import Any, NoReturn

import orjson

from cdk import cli, positions, tracing
from cdk.cli import SHUTDOWN_ALLOWANCE
from cdk.config import (
    ConfigError,
    ConnectorConfig,
    DeliveryConfig,
    SinkConfig,
    SourceConfig,
    load_config,
    masked_dump,
    resolve_paths,
)
from cdk.connector import Connector, Sink, Source, WebhookSource
from cdk.delivery import parse_ce_overrides, tls_context
from cdk.logs import configure_logging, format_now, one_line
from cdk.polling import has_partitions
from cdk.service import Service, ServiceError, check_classes, service_for
from cdk.store import InUse, PositionStore, StoreError

__all__ = ["run", "run_sink", "run_source"]

_log = logging.getLogger("cdk.runtime")


class _Signals:
    """SIGTERM/SIGINT: the first asks for a graceful stop, the second ends the process.

    ``signal.signal``, not ``loop.add_signal_handler``: Python runs these even while a
    blocking ``initialize`` or ``destroy`` holds the loop, just when a second one must work.
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

    def uninstall(self, final: bool = False) -> None:
        """Put the previous handlers back; ``final``: ignore signals instead, as CPython
        restores the default action (death by signal) while the interpreter shuts down."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if final else previous)
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
            # A loop already closed (the process exits) has nothing left to stop.
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
    os.write(2, format_now(logging.ERROR, "cdk.runtime", message))
    os._exit(cli.EXIT_FAILURE)


class _Watchdog:
    """Ends the process when a signalled stop overruns its allowance. Disarmed only once
    the loop is closed: that waits for worker threads, and a plain ``def arrived`` that
    never returns would otherwise keep the process alive after "sink stopped"."""

    def __init__(self) -> None:
        self._timer: threading.Timer | None = None

    def arm(self, seconds: float) -> None:
        if self._timer is not None:
            return
        message = f"shutdown took longer than {seconds:g} s, stopping now"
        self._timer = threading.Timer(seconds, _force_exit, args=(message,))
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def _first(*awaitables: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> None:
    """Wait for the first of ``awaitables`` to finish; cancel the others."""
    tasks = {asyncio.ensure_future(a) for a in awaitables}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _run_service(
    service: Service, grace: float, signals: _Signals, watchdog: _Watchdog
) -> int:
    signalled = signals.attach()
    try:
        await service.start()
    except ServiceError as exc:
        service.log.error("%s", exc)
        return cli.EXIT_FAILURE
    await _first(signalled.wait(), service.wait())
    if not signalled.is_set():
        # The service ended by itself: settle everything, unless a signal cuts it short
        # (service.stop shields the stop under way, so _first cancels only its own wait).
        await _first(signalled.wait(), service.stop())
    if signalled.is_set():
        watchdog.arm(grace + SHUTDOWN_ALLOWANCE)
        await service.stop(grace)
    return cli.EXIT_FAILURE if service.error is not None else cli.EXIT_OK


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop
    except ImportError:
        pass
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)


def _load(config_cls: type[ConnectorConfig], args: argparse.Namespace) -> ConnectorConfig:
    # A dry run, or a look at the positions, sends nothing: no target needed.
    admin = ("dry_run", "positions", "set_position", "reset_positions")
    offline = any(getattr(args, flag, None) for flag in admin)
    defaults = {"target": "http://dry-run.invalid/"} if offline else None
    config = load_config(config_cls, args.config, args.secret, defaults=defaults)
    flags = {"log_level": args.log_level, "log_format": args.log_format}
    update = {key: value for key, value in flags.items() if value is not None}
    return config.model_copy(update=update) if update else config


def _overrides(config: ConnectorConfig) -> dict[str, Any] | None:
    """``K_CE_OVERRIDES`` for a source, once ``K_CA_CERTS`` too was found readable."""
    if not isinstance(config, DeliveryConfig):
        return None
    try:
        tls_context(config)
        return parse_ce_overrides(os.environ.get("K_CE_OVERRIDES")) or None
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None


def _main(
    config_cls: type[Any], connector_cls: type[Any], argv: Sequence[str] | None, signals: _Signals
) -> int:
    try:
        kind = check_classes(config_cls, connector_cls).kind
    except TypeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return cli.EXIT_FAILURE
    name = connector_cls.__name__
    args = cli.build_parser(kind, name, config_cls).parse_args(argv)
    if args.about:
        print(orjson.dumps(cli.about(config_cls, kind, name), option=orjson.OPT_INDENT_2).decode())
        return cli.EXIT_OK
    try:
        config = _load(config_cls, args)
        overrides = _overrides(config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return cli.EXIT_CONFIG
    if args.check_config:
        print(f"config OK: {resolve_paths(args.config, args.secret)[0]}")
        return cli.EXIT_OK
    configure_logging(config.log_level, config.log_format)
    tracing.setup(service_name=cli.project_metadata().get("name", name))
    effective = orjson.dumps(masked_dump(config), option=orjson.OPT_SORT_KEYS).decode()
    _log.debug("effective config: %s", effective)
    if kind == "source" and (args.positions or args.set_position or args.reset_positions):
        return _manage_positions(config, connector_cls, args)
    options: dict[str, Any] = {}
    if kind == "source":
        options = {"overrides": overrides, "dry_run": args.dry_run, "max_events": args.max_events}
    try:
        connector = connector_cls()
        service = service_for(connector, config, **options)
    except Exception as exc:
        _log.debug("constructor raised", exc_info=True)
        _log.error("cannot create %s: %s", name, one_line(exc))
        return cli.EXIT_FAILURE
    if signals.received is not None:
        _log.info("received %s, shutting down", signals.received)
        return cli.EXIT_OK
    watchdog = _Watchdog()
    try:
        return _run_loop(_run_service(service, config.grace_period, signals, watchdog))
    except Exception:
        _log.exception("unexpected failure")
        return cli.EXIT_FAILURE
    finally:
        watchdog.disarm()


def _manage_positions(
    config: ConnectorConfig, connector_cls: type[Connector[Any]], args: argparse.Namespace
) -> int:
    """``--positions``, ``--set-position``, ``--reset-positions``: one look or change, by hand."""
    if not isinstance(config, SourceConfig) or not issubclass(connector_cls, Source):
        _log.error("a webhook source keeps no positions")
        return cli.EXIT_CONFIG
    if config.position_store is None:
        _log.error("position_store is not set: positions live only in a running connector")
        return cli.EXIT_CONFIG
    try:
        connector = connector_cls()
        namespace, partitioned = connector.name(), has_partitions(connector)
    except Exception as exc:
        _log.error("cannot create %s: %s", connector_cls.__name__, one_line(exc))
        return cli.EXIT_FAILURE
    try:
        with PositionStore.from_config(config, namespace) as store:
            if args.positions:
                print(orjson.dumps(positions.stored(store, partitioned)).decode())
                return cli.EXIT_OK
            store.exclusive()
            if args.set_position:
                change = positions.set_position(store, partitioned, args.set_position)
            else:
                only = None if args.reset_positions == cli.ALL_PARTITIONS else args.reset_positions
                change = positions.reset_positions(store, partitioned, only)
    except (positions.Refused, InUse) as exc:
        _log.error("%s", exc)
        return cli.EXIT_CONFIG
    except (StoreError, TypeError) as exc:
        _log.error("%s", exc)
        return cli.EXIT_FAILURE
    _log.info("%s changed by hand: %s", namespace, change)
    return cli.EXIT_OK


def run(
    config_cls: type[Any],
    connector_cls: type[Connector[Any]],
    argv: Sequence[str] | None = None,
    *,
    final: bool = False,
) -> int:
    """Run a connector in this process until it stops; returns the exit status.
    ``final``: the process ends right after, so signals stay handled to the very end."""
    signals = _Signals()
    # From the very start: loading the config and the connector's constructor may take a
    # while, and a signal meanwhile must ask for a clean stop, not kill the process.
    signals.install()
    try:
        return _main(config_cls, connector_cls, argv, signals)
    finally:
        tracing.shutdown()  # flushes spans still buffered
        signals.uninstall(final=final)
        logging.shutdown()


def run_source(
    config_cls: type[DeliveryConfig],
    source_cls: type[Source[Any] | WebhookSource[Any]],
    argv: Sequence[str] | None = None,
) -> NoReturn:
    """Run a source connector as this process; exits 0, 1 or 2 (see ``--help``)."""
    sys.exit(run(config_cls, source_cls, argv, final=True))


def run_sink(
    config_cls: type[SinkConfig], sink_cls: type[Sink[Any]], argv: Sequence[str] | None = None
) -> NoReturn:
    """Run a sink connector as this process; exits 0, 1 or 2 (see ``--help``)."""
    sys.exit(run(config_cls, sink_cls, argv, final=True))
