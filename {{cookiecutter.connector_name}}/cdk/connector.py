"""The user-facing connector types: what a connector author subclasses and returns.

A source pushes :class:`Tuple` objects into ``Source.chan``; the runtime delivers them.
A sink implements :meth:`Sink.arrived` and answers with a :class:`Result`.
Nothing here does I/O: the runtime (``cdk.runtime``) drives these objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cloudevents.core.v1.event import CloudEvent

if TYPE_CHECKING:
    from cdk.config import SinkConfig, SourceConfig, WebhookSourceConfig
    from cdk.http import Request

__all__ = ["SUCCESS", "Result", "Sink", "Source", "Tuple", "WebhookSource"]


@dataclass(slots=True)
class Tuple:
    """An event on its way to the target, with the callbacks that report its fate.

    Exactly one of ``success`` or ``failed`` is called, exactly once, after the
    event was delivered or given up on. ``failed`` receives the exception.
    """

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


class _Connector:
    """Lifecycle shared by sources and sinks: initialize once, destroy once."""

    def name(self) -> str:
        """A short name for logs and metrics; defaults to the class name."""
        return type(self).__name__

    def initialize(self, config: Any) -> Awaitable[None] | None:
        """Called once with the validated config before any event flows.

        May be ``async def``. Raising here stops the connector with exit status 1.
        """
        return None

    def destroy(self) -> Awaitable[None] | None:
        """Called once at shutdown, after the last event was handled. May be ``async def``."""
        return None


class Source(_Connector):
    """Base for polling sources.

    The runtime creates ``chan`` (a bounded ``asyncio.Queue`` of :class:`Tuple`),
    calls :meth:`initialize`, then runs :meth:`loop_produce_event` as a task while it
    drains ``chan`` towards the target. When ``loop_produce_event`` returns, the
    runtime delivers what is queued and shuts down.
    """

    chan: asyncio.Queue[Tuple]

    def initialize(self, config: SourceConfig) -> Awaitable[None] | None:
        return None

    async def loop_produce_event(self) -> None:
        """Produce events forever: ``await self.chan.put(cdk.Tuple(event, ...))``."""
        raise NotImplementedError(f"{type(self).__name__} must implement loop_produce_event()")


class WebhookSource(_Connector):
    """Base for sources that serve HTTP: each request becomes zero or more events.

    The runtime answers the caller only once every event made from the request was
    delivered (2xx) or given up on (an error status the caller can retry on).
    """

    def initialize(self, config: WebhookSourceConfig) -> Awaitable[None] | None:
        return None

    def make_event(
        self, request: Request
    ) -> CloudEvent | list[CloudEvent] | Awaitable[CloudEvent | list[CloudEvent] | None] | None:
        """Build the event(s) for one request; ``None`` or ``[]`` answers 202 with nothing sent.

        Raise ``cdk.HTTPError(status, message)`` to answer the caller with that status.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement make_event(request)")


class Sink(_Connector):
    """Base for sinks: :meth:`arrived` receives every event the server accepts.

    ``arrived`` may be ``async def`` (runs on the event loop) or a plain ``def``
    (runs in a worker thread so it never blocks the server). A batch arrives in one call.
    """

    def initialize(self, config: SinkConfig) -> Awaitable[None] | None:
        return None

    def arrived(self, *events: CloudEvent) -> Result | Awaitable[Result]:
        """Handle the events of one request; return ``cdk.SUCCESS`` or a failed Result."""
        raise NotImplementedError(f"{type(self).__name__} must implement arrived(*events)")
