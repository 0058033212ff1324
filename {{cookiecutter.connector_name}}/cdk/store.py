"""Positions: where a polling source remembers how far it got, across restarts.

:class:`PositionStore` keeps them (memory, SQLite or etcd); :class:`Checkpoint` writes a
position only past acknowledged events, so a source killed at any moment may send some
events again, never skip one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from orjson import OPT_PASSTHROUGH_DATACLASS, OPT_PASSTHROUGH_DATETIME, OPT_PASSTHROUGH_SUBCLASS

from cdk.config import ETCD_SCHEMES
from cdk.connector import Tuple
from cdk.delivery import DeadLettered, Fenced

if TYPE_CHECKING:
    from cloudevents.core.v1.event import CloudEvent

    from cdk.config import SourceConfig
    from cdk.etcd import Fence

__all__ = ["SUPERVISOR", "Checkpoint", "NotLeader", "PositionStore", "StoreError"]

# Values must round-trip: a datetime or dataclass is refused, not turned into a str or dict.
_DUMP_OPTIONS = OPT_PASSTHROUGH_DATETIME | OPT_PASSTHROUGH_DATACLASS | OPT_PASSTHROUGH_SUBCLASS

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS positions (namespace TEXT NOT NULL, key TEXT NOT NULL,"
    " value TEXT NOT NULL, PRIMARY KEY (namespace, key)) WITHOUT ROWID"
)


class StoreError(Exception):
    """The position store cannot be opened, read or written; the message names where it is."""


class NotLeader(StoreError):
    """A write fenced by leader election was refused: this replica does not lead (now)."""


class _Backend(Protocol):
    def get(self, namespace: str, key: str) -> bytes | None: ...
    def set(self, namespace: str, key: str, value: bytes) -> None: ...
    def delete(self, namespace: str, key: str) -> None: ...
    def close(self) -> None: ...


class _SQLiteBackend:
    """One SQLite file in WAL mode (in memory for ``path`` None); each ``set`` commits.
    ``synchronous=NORMAL``: a killed process loses no commit; an OS crash may drop the last
    ones, which only moves the resume point back. ``FULL`` would fsync every commit,
    milliseconds each on real disks, capping the events a second a source can acknowledge."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        # Callbacks run on the event loop and in worker threads: one lock, one connection.
        self._lock = threading.Lock()
        try:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path or ":memory:", isolation_level=None, check_same_thread=False, timeout=5.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"position store {path} cannot be opened: {exc}") from None

    def get(self, namespace: str, key: str) -> bytes | None:
        sql = "SELECT value FROM positions WHERE namespace = ? AND key = ?"
        row = self._run(sql, (namespace, key))
        return None if row is None else str(row[0]).encode()

    def set(self, namespace: str, key: str, value: bytes) -> None:
        self._run(
            "INSERT INTO positions (namespace, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value",
            (namespace, key, value.decode()),
        )

    def delete(self, namespace: str, key: str) -> None:
        self._run("DELETE FROM positions WHERE namespace = ? AND key = ?", (namespace, key))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, params: tuple[str, ...]) -> Any:
        with self._lock:  # fetchone() too steps the statement on the shared connection
            try:
                return self._db.execute(sql, params).fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"position store {self.path}: {exc}") from None


class PositionStore:
    """JSON values by key for one connector (``namespace``): in memory for ``path`` None,
    else in that SQLite file (connectors sharing it each see their own namespace) or
    ``etcd://host:2379/prefix``. Calls block: microseconds for SQLite, a round trip for etcd."""

    def __init__(
        self,
        namespace: str,
        path: str | os.PathLike[str] | None = None,
        *,
        backend: _Backend | None = None,
    ) -> None:
        if not namespace:
            raise ValueError("PositionStore needs a non-empty namespace (the connector's name)")
        self.namespace = namespace
        self._where = "memory" if path is None else os.fspath(path)
        if backend is None and self._where.startswith(ETCD_SCHEMES):
            from cdk.etcd import EtcdBackend  # only etcd users need its client library

            backend = EtcdBackend(self._where)
        self.path = None if path is None or backend else Path(path)
        self._backend = backend or _SQLiteBackend(self.path)
        self._closed = False

    @classmethod
    def from_config(
        cls, config: SourceConfig, namespace: str, leadership: Fence | None = None
    ) -> PositionStore:
        """The store ``config.position_store`` names; ``leadership`` fences etcd writes."""
        if not str(url := config.position_store).startswith(ETCD_SCHEMES):
            return cls(namespace, url)
        from cdk.etcd import Access, EtcdBackend

        backend = EtcdBackend(str(url), leadership, Access.from_config(config))
        return cls(namespace, url, backend=backend)

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when there is none."""
        raw = self._backend_checked().get(self.namespace, key)
        if raw is None:
            return default
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            # Only a damaged file or another program writing to it gets here.
            raise StoreError(f"{self!r}: the value of {key!r} is not JSON: {exc}") from None

    def set(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON: None, bool, int, float, str, list, dict with str keys)."""
        self._backend_checked().set(self.namespace, key, _dumps(value, key))

    def delete(self, key: str) -> None:
        """Forget ``key``; nothing happens when it is not stored."""
        self._backend_checked().delete(self.namespace, key)

    def close(self) -> None:
        """Release the store; later calls raise :class:`StoreError`. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._backend.close()

    def __enter__(self) -> PositionStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PositionStore(namespace={self.namespace!r}, {self._where})"

    def _backend_checked(self) -> _Backend:
        if self._closed:
            raise StoreError(f"{self!r} is closed")
        return self._backend


def _dumps(value: Any, name: object) -> bytes:
    try:
        return orjson.dumps(value, option=_DUMP_OPTIONS)
    except TypeError as exc:
        raise TypeError(f"position {name!r} must be a JSON value: {exc}") from None


#: Stands for "no event waiting"; equal to no position a source could give.
_NOTHING = object()


class Supervisor(Protocol):
    """What a running source offers the checkpoints made while it runs (see ``SUPERVISOR``)."""

    def watch(self, checkpoint: Checkpoint) -> None: ...  # flush it before ``destroy`` runs
    def gap(self, message: str) -> None: ...  # an event failed for good: stop, settle, exit 1


#: Set by the kit while a source runs, for the checkpoints made then: a failed event
#: stops the source instead of leaving a gap, and the last position is written first.
SUPERVISOR: ContextVar[Supervisor | None] = ContextVar("cdk_supervisor", default=None)


@dataclass(slots=True)
class _Pending:
    position: Any
    event_id: str | None
    acked: bool = False


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
        _dumps(position, position)
        entry = _Pending(position, event_id)
        if self.failed is None:
            self._pending.append(entry)

        def success() -> None:
            entry.acked = True
            self._advance()

        return success, functools.partial(self._fail, entry)

    def tuple(
        self,
        event: CloudEvent,
        position: Any,
        success: Callable[[], Any] | None = None,
        failed: Callable[[BaseException], Any] | None = None,
    ) -> Tuple:
        """A :class:`cdk.Tuple` for ``event`` whose callbacks feed the checkpoint first,
        then call the given ``success`` / ``failed``, if any."""
        on_success, on_failed = self.track(position, str(event.get_id()))
        return Tuple(event, _chain(on_success, success), _chain(on_failed, failed))

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
            entry.acked = True
            self._advance()
            return
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
        self.failed = error
        # Nothing after it may ever be written: a source producing on must not grow this.
        self._pending.clear()
        # The newest acknowledged position: written, or about to be.
        resume = self.position if self._unwritten is _NOTHING else self._unwritten
        where = "its start" if resume is None else f"after position {resume!r}"
        message = (
            f"event {entry.event_id or '?'} (position {entry.position!r}) was not delivered: "
            f"{error}; a restart resumes from {where}"
        )
        if self._supervisor is not None:
            self._supervisor.gap(message)
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
