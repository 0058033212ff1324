"""The user-facing connector types: what a connector author subclasses and returns.

The bases are generic in their config model: ``class MySource(cdk.Source[Config])`` sees
``self.config`` as a ``Config``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from cloudevents.core.v1.event import CloudEvent

if TYPE_CHECKING:
    from cdk.config import ConnectorConfig, SinkConfig, SourceConfig, WebhookSourceConfig
    from cdk.http import Request
    from cdk.metrics import Metrics

__all__ = [
    "SUCCESS",
    "Connector",
    "FatalError",
    "Result",
    "Sink",
    "Source",
    "Tuple",
    "WebhookSource",
]

C = TypeVar("C", bound="ConnectorConfig")
SC = TypeVar("SC", bound="SourceConfig")
WC = TypeVar("WC", bound="WebhookSourceConfig")
KC = TypeVar("KC", bound="SinkConfig")

#: What a polling source's ``make_event`` returns (or its coroutine does): nothing now
#: (None or ``[]``), an event, ``(event, position)``, or a page: a list of either.
Made = CloudEvent | tuple[CloudEvent, Any] | Sequence[CloudEvent | tuple[CloudEvent, Any]] | None


class FatalError(Exception):
    """Raise it in a polling source's ``make_event`` or ``partitions`` when retrying cannot
    help: the source settles the events in flight and exits 1 with this one line. Any
    other exception there is logged and the call retried with backoff."""


@dataclass(slots=True)
class Tuple:
    """An event on its way to the target, with the callbacks that report its fate: once it
    was delivered or given up on, ``success()`` or ``failed(exception)`` is called, once."""

    event: CloudEvent
    success: Callable[[], Any] | None = None
    failed: Callable[[BaseException], Any] | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """What a sink answers: ``code`` 0 is success, otherwise an HTTP status 400-599."""

    code: int = 0
    message: str = ""

    def __post_init__(self) -> None:
        if self.code != 0 and not 400 <= self.code <= 599:
            raise ValueError(f"Result code must be 0 or an HTTP status 400-599, got {self.code}")

    @property
    def ok(self) -> bool:
        return self.code == 0


SUCCESS = Result(0, "")


async def call(function: Callable[..., Any], *args: Any, thread: bool = False) -> Any:
    """Call a plain or ``async`` hook; ``thread=True`` runs a plain one in a worker thread."""
    if thread and not inspect.iscoroutinefunction(function):
        result = await asyncio.to_thread(function, *args)
    else:
        result = function(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


class Connector(Generic[C]):
    """Lifecycle shared by sources and sinks: ``initialize`` once, ``destroy`` once."""

    #: The validated configuration, set by the kit before :meth:`initialize`.
    config: C
    #: The kit's metrics, set before :meth:`initialize`: add your own series to
    #: ``metrics.registry`` (``prometheus_client.Counter(..., registry=...)``).
    metrics: Metrics

    def name(self) -> str:
        """A short name for logs and metrics; defaults to the class name."""
        return type(self).__name__

    def initialize(self, config: C) -> Awaitable[None] | None:
        """Called once with the validated config before any event flows; may be ``async
        def``. Raising here stops the connector with exit status 1."""
        return None

    def destroy(self) -> Awaitable[None] | None:
        """Called once at shutdown, after the last event was handled. May be ``async def``."""
        return None

    def ready(self) -> bool | Awaitable[bool]:
        """Whether the connector can take work now (``GET /readyz``); may be ``async def``.
        Return False (or raise) while a dependency is down, e.g. a sink's database."""
        return True


class Source(Connector[SC]):
    """Base for polling sources: implement :meth:`make_event` (and, to read several
    partitions, :meth:`partitions`), or override :meth:`loop_produce_event`
    (``await self.chan.put(cdk.Tuple(event, success, failed))``); once that loop returns,
    the kit delivers what is queued and the process exits 0."""

    chan: asyncio.Queue[Tuple]
    #: The position to resume after (a source without partitions): the last one
    #: ``make_event`` returned, or, at start, the last one whose events were all
    #: acknowledged (None on the very first run).
    position: Any = None
    #: The same for each partition (a source with :meth:`partitions`): name -> position.
    #: Set by the kit before ``initialize``.
    positions: dict[str, Any]
    #: Set by the kit: the ``cdk.Checkpoint`` that records the positions of a source
    #: without partitions (for a hand-written ``loop_produce_event``).
    checkpoint: Any = None
    #: Set by the kit: its own loop, which the default ``loop_produce_event`` runs.
    _kit_loop: Callable[[], Awaitable[None]] | None = None

    def make_event(self, *args: Any, **kwargs: Any) -> Made | Awaitable[Made]:
        """What to send next: None or ``[]`` for nothing now, an event, ``(event,
        position)`` to resume after it, or a page: a list of events or pairs, sent in order.

        Called as ``make_event()``, or ``make_event(partition)`` when :meth:`partitions` is
        defined. A plain ``def`` runs in a worker thread (blocking reads are fine), an
        ``async def`` on the event loop. A position is saved once its event and every one
        before it were acknowledged, so a restart resumes after it (``self.position``,
        ``self.positions[partition]``). An exception is retried with backoff;
        ``raise cdk.FatalError("why")`` stops the source.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement make_event()")

    def partitions(self) -> Sequence[str] | Awaitable[Sequence[str]] | None:
        """Optional (plain or ``async def``): the names of the partitions this source reads
        (tables, shards, accounts). Each keeps its own position; the kit calls
        ``make_event(partition)`` for each, and asks again every ``partition_refresh`` s."""
        return None

    async def loop_produce_event(self) -> None:
        """The kit's loop: call :meth:`make_event` (per partition), every ``interval``
        seconds, or ``idle_interval`` after a call that returned nothing, until stopped."""
        if self._kit_loop is None:
            raise RuntimeError("the kit runs loop_produce_event: see cdk.run_source")
        await self._kit_loop()


class WebhookSource(Connector[WC]):
    """Base for sources that serve HTTP: each request becomes zero or more events, and the
    caller is answered once they were delivered (2xx) or given up on (an error status)."""

    def make_event(
        self, request: Request
    ) -> CloudEvent | list[CloudEvent] | Awaitable[CloudEvent | list[CloudEvent] | None] | None:
        """Build the event(s) for one request; ``None`` or ``[]`` answers 202 with nothing sent.
        Raise ``cdk.HTTPError(status, message)`` to answer the caller with that status."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_event(request)")


class Sink(Connector[KC]):
    """Base for sinks: :meth:`arrived` receives every event the server accepts, a batch in
    one call. An ``async def`` runs on the event loop, a plain ``def`` in a worker thread."""

    def arrived(self, *events: CloudEvent) -> Result | Awaitable[Result]:
        """Handle the events of one request; return ``cdk.SUCCESS`` or a failed Result."""
        raise NotImplementedError(f"{type(self).__name__} must implement arrived(*events)")
