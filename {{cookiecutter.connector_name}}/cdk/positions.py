"""Positions and their bookkeeping: what a polling source writes to its store, and when.

:class:`Checkpoint` writes a position only past acknowledged events, so a source killed at
any moment may send some events again, never skip one. It sits above delivery (it reads
delivery's outcomes) and below the polling loop (``cdk.polling``), which keeps one per
partition.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from cdk.connector import Tuple
from cdk.delivery import AttemptsExhausted, DeadLettered, Fenced
from cdk.store import NotLeader, PositionStore, StoreError, dumps

if TYPE_CHECKING:
    from cloudevents.core.v1.event import CloudEvent

__all__ = [
    "KEY",
    "SUPERVISOR",
    "Checkpoint",
    "Refused",
    "Supervisor",
    "Tracked",
    "partition_key",
    "reset_positions",
    "set_position",
    "stored",
]

#: Stands for "no event waiting"; equal to no position a source could give.
_NOTHING = object()


class Supervisor(Protocol):
    """What a running source offers the checkpoints made while it runs (see ``SUPERVISOR``)."""

    def watch(self, checkpoint: Checkpoint) -> None: ...  # flush it before ``destroy`` runs
    # An event failed for good: stop, settle, exit 1 (a stop asked for only says so).
    def gap(self, message: str) -> None: ...
    # The target is out (attempts ran out): True when the supervisor sends ``item`` again
    # until it is delivered or let go (``release`` says which); False: a gap after all.
    def hold(self, item: Tuple, message: str) -> bool: ...
    def release(self, item: Tuple, delivered: bool) -> None: ...


#: Set by the kit while a source runs, for the checkpoints made then: a failed event
#: stops the source instead of leaving a gap, and the last position is written first.
SUPERVISOR: ContextVar[Supervisor | None] = ContextVar("cdk_supervisor", default=None)


@dataclass(slots=True)
class Tracked(Tuple):
    """A :class:`cdk.Tuple` made by :meth:`Checkpoint.tuple`: its position is recorded."""

    supervised: bool = False  # its checkpoint runs under the kit: an outage holds it
    key: str = ""  # its checkpoint's: which partition it is of (the delivery gate asks)


@dataclass(slots=True)
class _Pending:
    position: Any
    event_id: str | None
    acked: bool = False
    item: Tuple | None = None  # the Tuple to send again during an outage (``tuple()`` only)
    held: bool = False  # sent again by the supervisor until delivered


class Checkpoint:
    """Writes a position to the store only once every event before it was acknowledged.

    Call :meth:`track`, or ``await self.chan.put(checkpoint.tuple(event, position))``, for each
    event *in the order the source produces them*, with the position to resume after it. On an
    event loop, writes run in a worker thread, coalesced, retried while the store is away. An
    event that failed for good (a dead-lettered one counts as acknowledged) stops the checkpoint
    (:attr:`failed`); under the kit the source then settles and exits 1 naming it.
    """

    def __init__(
        self, store: PositionStore, key: str = "position", logger: logging.Logger | None = None
    ) -> None:
        self.store, self.key = store, key
        self.log = logger or logging.getLogger("cdk.store")
        #: The last position written (or read back from the store at start).
        self.position: Any = store.get(key)
        #: The error of the first event that failed; the checkpoint no longer advances.
        self.failed: BaseException | None = None
        self._pending: deque[_Pending] = deque()
        self._unwritten: Any = _NOTHING
        self._writer: asyncio.Task[None] | None = None
        self._supervisor = SUPERVISOR.get()
        if self._supervisor is not None:
            self._supervisor.watch(self)

    def track(
        self, position: Any, event_id: str | None = None
    ) -> tuple[Callable[[], None], Callable[[BaseException], None]]:
        """Register the next event; returns its ``(success, failed)`` callbacks."""
        return self._track(position, event_id)[1:]

    def _track(
        self, position: Any, event_id: str | None
    ) -> tuple[_Pending, Callable[[], None], Callable[[BaseException], None]]:
        dumps(position, position)
        entry = _Pending(position, event_id)
        if self.failed is None:
            self._pending.append(entry)

        return entry, functools.partial(self._acked, entry), functools.partial(self._fail, entry)

    def _unhold(self, entry: _Pending, delivered: bool) -> None:
        """The supervisor sends ``entry``'s event again no more: it was delivered, or let go."""
        if entry.held and self._supervisor is not None and entry.item is not None:
            entry.held = False
            self._supervisor.release(entry.item, delivered)

    def _acked(self, entry: _Pending) -> None:
        entry.acked = True
        self._unhold(entry, delivered=True)
        # The item's callbacks refer to the entry: break the cycle, so the pair is freed
        # now, not by the garbage collector (which a page of 500 events keeps busy).
        entry.item = None
        self._advance()

    def tuple(
        self,
        event: CloudEvent,
        position: Any,
        success: Callable[[], Any] | None = None,
        failed: Callable[[BaseException], Any] | None = None,
    ) -> Tuple:
        """A :class:`cdk.Tuple` for ``event`` whose callbacks feed the checkpoint first,
        then call the given ``success`` / ``failed``, if any."""
        entry, on_success, on_failed = self._track(position, str(event.get_id()))

        def on_fail(error: BaseException) -> Any:
            on_failed(error)
            if failed is not None and not entry.held:  # a held event is not failed yet
                return failed(error)
            return None

        supervised = self._supervisor is not None
        entry.item = Tracked(event, _chain(on_success, success), on_fail, supervised, self.key)
        return entry.item

    @property
    def waiting(self) -> int:
        """How many events tracked so far are not settled yet."""
        return len(self._pending)

    def abandon(self) -> None:
        """Write nothing more: this replica's term as leader ended (or the source stops)."""
        self._pending.clear()
        self._void()
        if self._writer is not None:
            self._writer.cancel()

    def _void(self) -> None:
        # Also called in the writer's thread, which has no event loop: only two attributes.
        self.failed = self.failed or NotLeader("this checkpoint's term as leader ended")
        self._unwritten = _NOTHING

    async def flush(self) -> None:
        """Wait until the newest acknowledged position is written."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def _advance(self) -> None:
        if self.failed is not None:
            return
        done: list[_Pending] = []
        while self._pending and self._pending[0].acked:
            done.append(self._pending.popleft())
        # Several events may share a position (one record, several events): resuming
        # after it is safe only once the last of them is acknowledged too.
        waiting = self._pending[0].position if self._pending else _NOTHING
        for entry in reversed(done):
            if entry.position != waiting:
                self._write(entry.position)
                return

    def _fail(self, entry: _Pending, error: BaseException) -> None:
        if isinstance(error, DeadLettered):
            # The dead-letter target holds the event: nothing is lost by moving on.
            self._acked(entry)
            return
        if not isinstance(error, AttemptsExhausted) or self.failed is not None:
            # Fenced off, cut short by a stop, refused: a held event waits for no resend now,
            # and production must not stay paused for it.
            self._unhold(entry, delivered=False)
        if self.failed is not None:
            return
        if isinstance(error, Fenced):
            # This replica's lease may be gone: the leader now resends from the position it
            # finds stored. Nothing is lost, nothing more is written: the term is over.
            self.log.warning(
                "checkpoint %r: event %s and those after it are left to the replica that "
                "leads now (%s)",
                self.key,
                entry.event_id or "?",
                error,
            )
            self._pending.clear()
            self._void()
            return
        resume = self.position if self._unwritten is _NOTHING else self._unwritten
        where = "its start" if resume is None else f"after position {resume!r}"
        about = f"event {entry.event_id or '?'} (position {entry.position!r})"
        supervisor = self._supervisor
        if isinstance(error, AttemptsExhausted) and entry.item is not None and supervisor:
            # An outage, not a bad event: production pauses while this one is sent again.
            if supervisor.hold(entry.item, f"{about} was not delivered: {error}"):
                entry.held = True
                return
            self._unhold(entry, delivered=False)  # held before, not any more: a gap after all
        entry.item = None
        self.failed = error
        # Nothing after it may ever be written: a source producing on must not grow this.
        self._pending.clear()
        message = f"{about} was not delivered: {error}; a restart resumes from {where}"
        if supervisor is not None:
            supervisor.gap(message)
        else:
            self.log.error("checkpoint %r stopped: %s", self.key, message)

    def _write(self, position: Any) -> None:
        self._unwritten = position
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_pending()  # no event loop: write now
            return
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_loop(), name="cdk-checkpoint")

    def _write_pending(self) -> bool:
        """Write the newest unwritten position; False when the store refused it."""
        position = self._unwritten
        try:
            self.store.set(self.key, position)
        except NotLeader as exc:
            # Another replica leads now and writes its own positions: this one is void.
            self.log.warning("checkpoint %r: position %r dropped: %s", self.key, position, exc)
            self._void()  # the writer ends by itself: nothing is left to write
            return True
        except StoreError as exc:
            self.log.error(
                "checkpoint %r: position %r could not be written: %s", self.key, position, exc
            )
            return False
        self.position = position
        if self._unwritten is position:
            self._unwritten = _NOTHING
        return True

    async def _write_loop(self) -> None:
        delay = 0.05  # before the first retry of a refused write; doubled up to 5 s
        while self._unwritten is not _NOTHING:
            if await asyncio.to_thread(self._write_pending):
                delay = 0.05
                # At most a write per 50 ms, not etcd writing flat out for positions soon replaced.
                await asyncio.sleep(0.05)
            else:
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)


def _chain(first: Callable[..., None], then: Callable[..., Any] | None) -> Callable[..., Any]:
    if then is None:
        return first

    def both(*args: Any) -> Any:
        first(*args)
        return then(*args)  # an awaitable, from an async def, is awaited by delivery

    return both


# -- positions by hand: cmd/main.py --positions, --set-position, --reset-positions ------------

#: The store key of a source without partitions.
KEY = "position"
_PARTITION = "partition/"


def partition_key(name: str) -> str:
    """The store key of partition ``name``'s position."""
    return _PARTITION + name


class Refused(Exception):
    """A change by hand that cannot be made; ``str()`` is one line (the process exits 2)."""


def stored(store: PositionStore, partitioned: bool) -> dict[str, Any]:
    """The stored positions: partition name -> position, or ``{"position": ...}``."""
    if not partitioned:
        return {KEY: store.get(KEY)}
    names = [
        key.removeprefix(_PARTITION) for key in store.stored_keys() if key.startswith(_PARTITION)
    ]
    return {name: store.get(partition_key(name)) for name in names}


def set_position(store: PositionStore, partitioned: bool, spec: str) -> str:
    """``[PARTITION=]VALUE`` (VALUE as JSON, else a string); the line saying what changed."""
    if partitioned:
        name, equals, text = spec.partition("=")
        if not equals or not name:
            raise Refused("this source has partitions: --set-position PARTITION=VALUE")
        key, what = partition_key(name), f"partition {name!r}"
    else:
        key, what, text = KEY, "position", spec
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = text
    before = store.get(key)
    store.set(key, value)
    return f"{what}: {before!r} -> {value!r}"


def reset_positions(store: PositionStore, partitioned: bool, partition: str | None) -> str:
    """Forget ``partition``'s position (None: every one); the line saying what changed."""
    if partition is not None and not partitioned:
        raise Refused("this source has no partitions: --reset-positions takes no PARTITION")
    old = stored(store, partitioned)
    names = list(old) if partition is None else [partition]
    for name in names:
        store.delete(partition_key(name) if partitioned else KEY)
    if not partitioned:
        return f"position: {old[KEY]!r} -> None (the next run starts from the beginning)"
    changes = ", ".join(f"{name!r}: {old.get(name)!r} -> None" for name in names)
    return f"partitions reset ({changes or 'none stored'})"
