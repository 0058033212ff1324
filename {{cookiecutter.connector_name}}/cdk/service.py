"""Services: a connector's lifecycle in-process, without the process around it.

:func:`service_for` picks the service by the connector's class (sink, polling source,
webhook source). Each calls ``initialize`` and ``destroy`` exactly once; ``cdk.runtime``
runs one as a process, ``cdk.testing`` in a thread. Lines other programs wait for (INFO,
stable): ``sink listening on http://HOST:PORT``, ``source listening on ...`` (webhook) or
``metrics listening on ...`` (``metrics_port``), ``source started, target=URL`` (a
source's last start-up line), ``sink stopped`` / ``source stopped``. ``stop(grace)``
lets in-flight work finish within ``grace`` seconds; ``stop()`` (a source that finished
by itself) settles every event first, and a later ``stop(grace)`` hurries it up.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import Gauge

from cdk.codec import to_structured, with_extensions
from cdk.config import (
    DeliveryConfig,
    ServerConfig,
    SinkConfig,
    SourceConfig,
    WebhookSourceConfig,
    redact_url,
)
from cdk.connector import Connector, FatalError, Sink, Source, Tuple, WebhookSource, call
from cdk.deadletter import DeadLetters
from cdk.dedupe import Dedupe, DedupeError, open_dedupe
from cdk.delivery import Deliverer, DeliveryQueue, Gate
from cdk.http import Handler, HTTPServer, Request, Response
from cdk.logs import one_line
from cdk.metrics import Metrics
from cdk.polling import Poller, has_partitions
from cdk.positions import SUPERVISOR, Checkpoint, Tracked, partition_key
from cdk.receiver import Receiver, SinkHandler
from cdk.store import PositionStore, StoreError

if TYPE_CHECKING:
    from cdk.etcd import Leadership, PartitionLeases

__all__ = ["Service", "ServiceError", "check_classes", "service_for"]


#: The fewest seconds between two warnings that production is still paused.
REMINDER = 30.0


class ServiceError(Exception):
    """A connector could not start or run; ``str()`` is one line a user can act on."""


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Service:
    kind: ClassVar[str]
    #: What the service's HTTP port is, in the "... listening on" line.
    role: ClassVar[str]
    series: ClassVar[Mapping[str, bool]] = {}  # which Metrics series it has

    def __init__(self, connector: Connector[Any], config: Any, metrics: Metrics | None = None):
        self.connector = connector
        self.config = config
        self.metrics = metrics or Metrics(connector.name(), **self.series)
        self.log = logging.getLogger(f"cdk.{self.kind}")
        self.receiver: Receiver | None = None
        self.server: HTTPServer | None = None
        #: The first runtime failure, once stopped (the process then exits 1).
        self.error: BaseException | None = None
        self._state = "new"  # new -> started -> initialized -> destroyed
        self._finished = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None
        #: A stop with a deadline was asked for (a signal): what it leaves unsent is no loss.
        self._cut_short = False

    @property
    def port(self) -> int:
        """The port served (the bound one when the config says 0)."""
        if self.server is None:
            raise RuntimeError(f"the {self.kind} serves no HTTP port (not started, or none)")
        return self.server.port

    async def start(self) -> None:
        """Call ``initialize``, then serve and run; raises :class:`ServiceError` on failure."""
        if self._state != "new":
            raise ServiceError("already started: a service runs once")
        self._state = "started"
        self.connector.config = self.config
        self.connector.metrics = self.metrics
        self._prepare()
        try:
            await call(self.connector.initialize, self.config)
        except Exception as exc:
            # One readable line at ERROR (by the caller); the traceback only at DEBUG.
            self.log.debug("initialize raised", exc_info=True)
            self._release()
            raise ServiceError(f"initialize failed: {one_line(exc)}") from exc
        self._state = "initialized"
        try:
            await self._begin()
        except BaseException:
            await self._end(0.0)
            raise
        if self.receiver is not None:
            self.receiver.ready = True
        if self.server is not None:
            self.log.info("%s listening on %s", self.role, _url(self.config.host, self.server.port))
        self._started()

    async def wait(self) -> None:
        """Return once the service ended by itself (finished, or failed)."""
        await self._finished.wait()

    async def linger(self, seconds: float) -> None:
        """Go on serving for ``seconds`` with ``/readyz`` answering 503 (``shutdown_delay``):
        Kubernetes stops routing to a terminating pod only some time after SIGTERM."""
        if self.receiver is None or seconds <= 0:
            return
        self.receiver.ready = False
        self.log.info("not ready; serving %g s more before stopping (shutdown_delay)", seconds)
        await asyncio.sleep(seconds)

    async def stop(self, grace: float | None = None) -> None:
        """Stop within ``grace`` seconds; without one, settle all work first (sources)."""
        if grace is not None:
            self._cut_short = True
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
            self._stopping.add_done_callback(lambda _: self._finished.set())
        elif grace is not None:
            self._hurry(grace)
        await asyncio.shield(self._stopping)

    def _fail(self, error: BaseException) -> None:
        self.error = self.error or error
        self._finished.set()

    async def _serve(self, post: Handler, config: ServerConfig, any_path: bool = False) -> None:
        """Serve ``post``; ``/readyz`` asks the connector's ``ready()`` if it has its own."""
        check = None if type(self.connector).ready is Connector.ready else self.connector.ready
        self.receiver = Receiver(post, config, self.metrics, any_path=any_path, ready_check=check)
        server = self.receiver.http_server()
        try:
            await server.start()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ServiceError(f"cannot listen on {config.host}:{config.port}: {reason}") from exc
        self.server = server

    async def _close_server(self, grace: float) -> None:
        if self.receiver is not None:
            self.receiver.ready = False
        if self.server is not None:
            await self.server.close(grace)

    async def _end(self, grace: float) -> None:
        """Undo ``_begin`` within ``grace`` seconds, then ``destroy`` (once, if initialized)."""
        await self._close_server(grace)
        if self._state == "initialized":
            self._state = "destroyed"
            try:
                await call(self.connector.destroy)
            except Exception as exc:
                self.log.exception("destroy raised")
                self.error = self.error or exc
        self._release()

    async def _stop(self, grace: float | None) -> None:
        await self._end(self.config.grace_period if grace is None else grace)
        self.log.info("%s stopped", self.kind)

    # -- what each service adds ---------------------------------------------------------

    def _prepare(self) -> None:
        """Before ``initialize``: give the connector what it may use there."""

    async def _begin(self) -> None:
        """After ``initialize``: serve and run."""

    def _started(self) -> None:
        """After the "listening" line."""

    def _hurry(self, grace: float) -> None:
        """A stop with a deadline arrived while one without was under way."""

    def _release(self) -> None:
        """Free what ``_prepare`` took."""


class SinkService(Service):
    """A sink: serve ``POST /``, hand events to ``arrived``, drain, ``destroy``."""

    kind = role = "sink"
    series: ClassVar[Mapping[str, bool]] = {"delivering": False}
    connector: Sink[Any]
    config: SinkConfig
    dead_letters: DeadLetters | None = None  # with a dead_letter_target, once begun
    dedupe: Dedupe | None = None  # with a dedupe_window, once begun

    async def _begin(self) -> None:
        config, name = self.config, self.connector.name()
        if config.dead_letter_target is not None:
            self.dead_letters = DeadLetters(config, name, self.metrics)
            self.dead_letters.start()
        try:
            self.dedupe = open_dedupe(config.dedupe_window, config.dedupe_store, name)
        except DedupeError as exc:
            raise ServiceError(str(exc)) from exc
        handler = SinkHandler(
            self.connector, self.metrics, dead_letters=self.dead_letters, dedupe=self.dedupe
        )
        await self._serve(handler, config)

    async def _close_server(self, grace: float) -> None:
        # In-flight requests wait for their dead letters: they close once those are settled.
        await super()._close_server(grace)
        if self.dead_letters is not None:
            await self.dead_letters.close(0.0)
        if self.dedupe is not None:
            await self.dedupe.close()


class _Chan(DeliveryQueue):
    """``Source.chan``: the delivery queue that, given a ``limit``, takes only that many events."""

    def __init__(self, maxsize: int, limit: int | None, on_limit: Callable[[], None]) -> None:
        super().__init__(maxsize)
        self._left = limit
        self._on_limit = on_limit

    def full(self) -> bool:
        return self._left == 0 or super().full()

    def put_nowait(self, item: Tuple) -> None:
        super().put_nowait(item)  # QueueFull once the limit is reached: full() says so
        if self._left is not None:
            self._left -= 1
            if self._left == 0:
                self._on_limit()

    async def put_back(self, item: Tuple) -> None:
        """Queue ``item`` again (an outage): it does not count against the limit."""
        if self._left is not None:
            self._left += 1
        await self.put(item)


class _Printer:
    """Stands in for the delivery engine in a dry run: one structured JSON line per event."""

    def __init__(self, overrides: Mapping[str, Any] | None) -> None:
        self.overrides = overrides
        self._chan: asyncio.Queue[Tuple] | None = None

    async def run(self, chan: asyncio.Queue[Tuple]) -> None:
        self._chan = chan
        while True:
            item = await chan.get()
            event = with_extensions(item.event, self.overrides) if self.overrides else item.event
            try:
                body = to_structured(event)[1]
            except ValueError as exc:
                outcome: Callable[..., Any] | None = item.failed
                args: tuple[Any, ...] = (exc,)
            else:
                sys.stdout.buffer.write(body + b"\n")
                sys.stdout.flush()
                outcome, args = item.success, ()
            chan.task_done()
            if outcome is not None:
                await call(outcome, *args)

    async def drain(self) -> None:
        if self._chan is not None:
            await self._chan.join()

    async def stop(self, grace: float) -> None:
        await self.drain()


class _SourceService(Service):
    """What both kinds of source share: ``chan``, the delivery engine, settling at the end."""

    kind = "source"
    config: DeliveryConfig

    def __init__(
        self,
        connector: Connector[Any],
        config: Any,
        metrics: Metrics | None = None,
        *,
        overrides: Mapping[str, Any] | None = None,
        dry_run: bool = False,
        max_events: int | None = None,
    ) -> None:
        super().__init__(connector, config, metrics)
        self.overrides = overrides
        self.dry_run = dry_run
        self.chan: asyncio.Queue[Tuple] = _Chan(config.queue_size, max_events, self._limit_reached)
        self.deliverer: Any = None
        #: Asked before each delivery (leader election: closed once the lease may be gone).
        self.gate: Gate | None = None
        self._delivering: asyncio.Task[None] | None = None
        self._hurrying: asyncio.Future[None] | None = None

    def _limit_reached(self) -> None:
        self.log.info("--max-events reached; delivering what is queued, then stopping")
        self._finished.set()

    async def _begin(self) -> None:
        if self.dry_run:
            self.deliverer = _Printer(self.overrides)
        else:
            self.deliverer = Deliverer(self.config, self.metrics, self.overrides, self.gate)
        self._delivering = asyncio.create_task(self._deliver(), name="cdk-deliver")

    def _started(self) -> None:
        target = "stdout (dry run)" if self.dry_run else redact_url(self.config.target)
        self.log.info("source started, target=%s", target)

    async def _deliver(self) -> None:
        try:
            await self.deliverer.run(self.chan)
        except Exception as exc:  # a cancellation is no Exception: it goes on
            self.log.exception("delivery stopped unexpectedly")
            self._fail(exc)

    def _hurry(self, grace: float) -> None:
        if self.deliverer is not None:
            # The drain under way ends once this stop has settled the rest.
            self._hurrying = asyncio.ensure_future(self.deliverer.stop(grace))

    async def _settle(self, grace: float | None) -> None:
        """Deliver (or fail) everything queued and in flight, then end the delivery task."""
        if self.deliverer is not None:
            await (self.deliverer.drain() if grace is None else self.deliverer.stop(grace))
        task = self._delivering
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})


class PollingSourceService(_SourceService):
    """A polling source: run ``loop_produce_event``, deliver ``chan``, settle, ``destroy``."""

    role = "metrics"
    series: ClassVar[Mapping[str, bool]] = {"receiving": False}
    connector: Source[Any]
    config: SourceConfig

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.store: PositionStore | None = None
        self.leadership: Leadership | None = None
        #: Under leader election, a source with partitions shares them out instead.
        self.partition_leases: PartitionLeases | None = None
        self.poller: Poller | None = None
        self._producing: asyncio.Task[None] | None = None
        self._checkpoints: list[Checkpoint] = []
        # Tracked events sent again until delivered (an outage), and their next waits.
        self._held: dict[int, float] = {}
        self._resending: set[asyncio.Task[None]] = set()
        self._outage: tuple[float, float, str] | None = None  # since, last warned, why

    # The supervisor of the checkpoints made while this source runs (cdk.positions.SUPERVISOR).
    def watch(self, checkpoint: Checkpoint) -> None:
        self._checkpoints.append(checkpoint)

    def gap(self, message: str) -> None:
        if self._cut_short:
            # A stop that was asked for: the position stays before the event, so the next
            # run sends it. Said once per checkpoint; the delivery engine counts the rest.
            self.log.info("stopped before an event was delivered: %s", message)
            return
        if not self._finished.is_set():
            self.log.error("stopping so no event is skipped: %s", message)
        self._fail(ServiceError(message))

    def hold(self, item: Tuple, message: str) -> bool:
        """An outage: pause production and send ``item`` again, with backoff, until it is
        delivered (or the source stops). Not once the source is finishing: a gap then."""
        if not self._holds(item) or self.dry_run:
            return False
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._outage is None:
            self._outage = (now, now, message)
            self.log.warning(
                "production paused: %s; sending it again until the target takes it", message
            )
            if self.poller is not None:
                self.poller.pause("production paused: tracked events are not delivered")
        elif now - self._outage[1] >= REMINDER:
            since = self._outage[0]
            self._outage = (since, now, message)
            self.log.warning("production still paused, for %.0f s: %s", now - since, message)
        config = self.config
        wait = self._held.get(id(item), max(config.retry_backoff, 0.01))
        self._held[id(item)] = min(config.retry_backoff_max, wait * 2) or wait
        task = loop.create_task(self._resend(item, wait), name="cdk-resend")
        self._resending.add(task)
        task.add_done_callback(self._resending.discard)
        return True

    def _holds(self, item: Tuple) -> bool:
        """Whether :meth:`hold` would take ``item`` if its attempts ran out now."""
        active = self._stopping is None and not self._finished.is_set()
        leads = self.leadership is None or self.leadership.is_leader  # a deposed one lets go
        return active and leads and isinstance(item, Tracked) and item.supervised

    def _let_go(self) -> None:
        """Stop sending held events again (the source stops, or lost the lead): they stay
        unacknowledged, so their positions are never written, and nothing is skipped."""
        for resend in list(self._resending):
            resend.cancel()
        self._held.clear()
        self._outage = None
        if self.poller is not None:
            self.poller.resume()

    def release(self, item: Tuple, delivered: bool) -> None:
        self._held.pop(id(item), None)
        if not self._held and self._outage is not None:
            seconds = asyncio.get_running_loop().time() - self._outage[0]
            self._outage = None
            if delivered:
                text = "production resumes: the target took the held events, after %.1f s"
            else:  # fenced off (another replica sends them now) or given up
                text = "production resumes: no held event waits to be sent again, after %.1f s"
            self.log.info(text, seconds)
            if self.poller is not None:
                self.poller.resume()

    async def _resend(self, item: Tuple, wait: float) -> None:
        await asyncio.sleep(wait)
        assert isinstance(self.chan, _Chan)
        await self.chan.put_back(item)

    def _trouble(self) -> str:
        return "" if self.poller is None else self.poller.trouble()

    def _prepare(self) -> None:
        source = self.connector
        if not inspect.iscoroutinefunction(source.loop_produce_event):
            # A plain def would block the event loop, and with it all delivery.
            raise ServiceError("loop_produce_event must be an async def")
        source.chan = self.chan
        source.positions = {}
        SUPERVISOR.set(self)
        # A dry run reads the positions, writes none and never takes the lead from a replica.
        if self.config.leader_election and not self.dry_run and has_partitions(source):
            from cdk.etcd import PartitionLeases

            leases = PartitionLeases.from_config(self.config, source.name())
            leases.key_prefix = partition_key("")
            self.partition_leases = leases
            self.gate = self._partition_gate
        elif self.config.leader_election and not self.dry_run:
            from cdk.etcd import Leadership

            self.leadership = Leadership.from_config(self.config, source.name())
            self.gate = self.leadership.gate
        try:
            fence = self.leadership or self.partition_leases
            self.store = PositionStore.from_config(
                self.config, source.name(), fence, read_only=self.dry_run
            )
            self.store.claim()  # changes by hand are refused while this source runs
            self._new_term()
            self.poller = Poller(source, self.store, self.config, self.metrics)
            source._kit_loop = self.poller.run
            if self.partition_leases is not None:
                self._share(self.partition_leases, self.poller)
        except StoreError as exc:
            self._release()
            raise ServiceError(str(exc)) from None

    def _share(self, leases: PartitionLeases, poller: Poller) -> None:
        """Run the partitions the leases give this replica: ``partitions()`` feeds them the
        list, and each partition's producer starts when its lease is won (from the position
        stored then) and stops when it is lost, once its events are settled if it still leads."""

        def claim(names: Sequence[str]) -> list[str]:
            leases.assign(names)
            return [name for name in names if name in poller.running]  # the leases start more

        def note() -> None:  # on /readyz: the partitions producing here
            count = len(poller.running)
            self._note(f" (leads {count} partition{'' if count == 1 else 's'})")

        async def gained(name: str) -> None:
            await poller.own(name)
            note()
            position = poller.running[name].checkpoint.position
            where = "the start" if position is None else f"position {position!r}"
            self.log.info("partition %r: leading, producing from %s", name, where)

        async def lost(name: str) -> None:
            part = poller.running.get(name)
            await poller.lose(name)
            note()
            if part is None:
                return
            checkpoint, loop = part.checkpoint, asyncio.get_running_loop()
            # Still leading (a hand-over), what it queued is delivered and its position written
            # before the key goes; after a lost lease the gate fails them at once.
            until = loop.time() + leases.lease / 2
            while checkpoint.waiting and checkpoint.failed is None and loop.time() < until:
                await asyncio.sleep(0.01)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(checkpoint.flush(), max(0.0, until - loop.time()))
            checkpoint.abandon()
            with contextlib.suppress(ValueError):  # partitions come and go: no list that grows
                self._checkpoints.remove(checkpoint)
            self.log.info("partition %r: no longer led here", name)

        poller.claim = claim
        leases.on_gain, leases.on_loss = gained, lost

    def _partition_gate(self, tuples: Sequence[Tuple]) -> str | None:
        """The delivery gate with partition leases: each event's partition must be led here."""
        assert self.partition_leases is not None
        prefix = partition_key("")
        for item in tuples:
            key = item.key if isinstance(item, Tracked) else ""
            partition = key[len(prefix) :] if key.startswith(prefix) else None
            reason = self.partition_leases.gate(partition)
            if reason is not None:
                return reason
        return None

    def _new_term(self) -> None:
        """A fresh checkpoint, starting from the position stored now."""
        assert self.store is not None
        source = self.connector
        source.checkpoint = Checkpoint(self.store, "position")
        source.position = source.checkpoint.position

    def _release(self) -> None:
        if self.store is not None:
            self.store.close()

    async def _begin(self) -> None:
        await super()._begin()
        if isinstance(self.deliverer, Deliverer):
            self.deliverer.holds = self._holds
        port = self.config.metrics_port
        if port is not None:
            settings = {"host": self.config.host, "port": port, "log_level": self.config.log_level}
            server_config = ServerConfig.model_validate(settings)
            await self._serve(_metrics_only, server_config)
            assert self.receiver is not None
            self.receiver.trouble = self._trouble
        if self.partition_leases is not None:
            leases = self.partition_leases
            description = "Partitions this replica leads (leader_election)."
            led = Gauge("cdk_partitions_led", description, registry=self.metrics.registry)
            led.set_function(lambda: len(leases.owned))
            await leases.start()
        produce = self._produce() if self.leadership is None else self._lead(self.leadership)
        self._producing = asyncio.create_task(produce, name="cdk-produce")

    def _note(self, role: str) -> None:
        if self.receiver is not None:
            self.receiver.note = role  # on /readyz: who leads

    async def _lead(self, leadership: Leadership) -> None:
        """Produce only while this replica leads; between terms, settle and campaign again."""
        description = "1 while this replica leads (leader_election)."
        leading = Gauge("cdk_leader", description, registry=self.metrics.registry)
        self._note(" (follower)")
        try:
            while True:
                self.log.info("campaigning to lead (leader_election)")
                await leadership.campaign()
                # Resume where the last leader left off: the position stored now, not the
                # one read at start-up (a follower may have waited for days).
                self._new_term()
                leading.set(1)
                self._note(" (leader)")
                self.log.info("leading: producing from position %r", self.connector.position)
                producer = asyncio.ensure_future(self._produce())
                lost = asyncio.ensure_future(leadership.lost())
                await asyncio.wait({producer, lost}, return_when=asyncio.FIRST_COMPLETED)
                lost.cancel()
                if producer.done():
                    return
                producer.cancel()
                await asyncio.wait({producer})
                leading.set(0)
                self._note(" (follower)")
                self.log.warning("lost the lead; settling the events in flight, then campaigning")
                self._let_go()
                await self.chan.join()
                for checkpoint in self._checkpoints:  # this term's, of each partition
                    checkpoint.abandon()
        finally:
            leading.set(0)

    async def _produce(self) -> None:
        try:
            await self.connector.loop_produce_event()
        except FatalError as exc:
            self.log.error("%s", exc)
            self._fail(exc)
        except Exception as exc:  # a cancellation is no Exception: it goes on
            self.log.exception(
                "loop_produce_event raised; delivering what is queued, then stopping"
            )
            self._fail(exc)
        else:
            self.log.info("loop_produce_event returned; delivering what is queued, then stopping")
            self._finished.set()

    async def _stop(self, grace: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if grace is None else loop.time() + grace
        task = self._producing
        self._let_go()
        if task is not None and not task.done():
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if not done:
                self.log.warning("loop_produce_event ignores cancellation; leaving it behind")
        await self._settle(grace)
        for checkpoint in self._checkpoints:
            left = 5.0 if deadline is None else max(0.1, deadline - loop.time())
            try:
                await asyncio.wait_for(checkpoint.flush(), left)
            except TimeoutError:
                self.log.error(
                    "checkpoint %r: the newest position could not be written", checkpoint.key
                )
        if self.leadership is not None:
            await self.leadership.resign()  # after the last position was written
        if self.partition_leases is not None:
            await self.partition_leases.stop()  # the same, for each partition
        await self._end(min(1.0, grace or 1.0))
        self.log.info("source stopped")


async def _metrics_only(request: Request) -> Response:
    body = b"this port serves GET /metrics, /healthz and /readyz only\n"
    return Response(405, body, headers=[("allow", "GET, HEAD")])


class WebhookSourceService(_SourceService):
    """A webhook source: serve HTTP, ``make_event(request)``, deliver, answer, ``destroy``."""

    role = "source"
    connector: WebhookSource[Any]
    config: WebhookSourceConfig

    async def _begin(self) -> None:
        from cdk.webhook import WebhookHandler

        await super()._begin()
        self.handler = WebhookHandler(self.connector, self.chan, self.metrics, config=self.config)
        await self._serve(self.handler, self.config, any_path=True)

    async def _stop(self, grace: float | None) -> None:
        grace = self.config.grace_period if grace is None else grace
        if self.receiver is not None:
            self.receiver.ready = False
        if getattr(self, "handler", None) is not None:
            self.handler.close()
        # Both at once: pending requests wait for their deliveries, whose deadline falls a
        # little earlier so those requests are still answered before connections close.
        margin = min(1.0, grace / 10)
        await asyncio.gather(self._close_server(grace), self._settle(max(0.0, grace - margin)))
        await self._end(0.0)
        self.log.info("source stopped")


#: Each connector base, the config model it needs, and the service that runs it.
_KINDS: tuple[tuple[type, type, type[Service]], ...] = (
    (Sink, SinkConfig, SinkService),
    (WebhookSource, WebhookSourceConfig, WebhookSourceService),
    (Source, SourceConfig, PollingSourceService),
)


def check_classes(config_cls: type, connector_cls: type) -> type[Service]:
    """The service class for ``connector_cls``; ``TypeError`` when the classes do not fit."""
    for base, config_base, service in _KINDS:
        if issubclass(connector_cls, base):
            if not issubclass(config_cls, config_base):
                raise TypeError(f"{config_cls.__name__} must extend cdk.{config_base.__name__}")
            return service
    bases = "cdk.Source, cdk.WebhookSource or cdk.Sink"
    raise TypeError(f"{connector_cls.__name__} must extend {bases}")


def service_for(connector: Connector[Any], config: Any, **options: Any) -> Service:
    """The service that runs ``connector`` with ``config``; ``TypeError`` if they do not fit.
    ``options`` go to source services: ``overrides``, ``dry_run``, ``max_events``."""
    service = check_classes(type(config), type(connector))
    return service(connector, config, **options)
