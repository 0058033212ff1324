"""Duplicates: which events a sink handled within ``dedupe_window`` seconds.

Delivery is at least once: a sender that got no answer sends again, and a batch answered
with a retryable status comes back whole. A sink with ``dedupe_window`` remembers the
``(source, id)`` of each event it handled (``arrived`` succeeded, or the dead-letter
target took it) and acknowledges it again without calling ``arrived``. Failures are not
remembered, so they are retried as before. :func:`open_dedupe` picks where the keys live
(``dedupe_store``): memory (bounded), an SQLite file (kept across restarts), or Redis
(shared by every replica). A store that fails is logged, and events then go to ``arrived``:
a duplicate is allowed, a lost event never.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson

from cdk.codec import AnyCloudEvent
from cdk.config import redact_url

__all__ = ["MEMORY_ENTRIES", "Dedupe", "DedupeError", "dedupe_key", "open_dedupe"]

#: The most keys the memory store holds; past it the oldest are forgotten first.
MEMORY_ENTRIES = 100_000
#: Seconds a Redis command may take before the store counts as failing.
_REDIS_TIMEOUT = 2.0
#: SQLite binds at most 32,766 parameters per statement; fewer keep each lookup short.
_SQLITE_CHUNK = 500
#: Remembered keys between two sweeps of the expired ones from an SQLite file.
_SWEEP_EVERY = 1000
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dedupe (key TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS dedupe_expires ON dedupe (expires)",
)
_log = logging.getLogger("cdk.dedupe")
E = TypeVar("E", bound=AnyCloudEvent)


class DedupeError(Exception):
    """The store could not be read or written; ``str()`` says which and why."""


def dedupe_key(event: AnyCloudEvent) -> str:
    """The key of ``event``: its ``(source, id)`` as a JSON array, unambiguous and readable."""
    return orjson.dumps([event.get_source(), event.get_id()]).decode()


class _Store(Protocol):
    async def seen(self, keys: Sequence[str]) -> list[bool]: ...
    async def remember(self, keys: Sequence[str]) -> None: ...
    async def close(self) -> None: ...


class _MemoryStore:
    def __init__(self, window: float, entries: int = MEMORY_ENTRIES) -> None:
        self._window, self._entries = window, entries
        # Insertion order is expiry order: every key lives for the same window.
        self._expires: OrderedDict[str, float] = OrderedDict()
        self._warned = False

    async def seen(self, keys: Sequence[str]) -> list[bool]:
        now, expires = time.monotonic(), self._expires
        return [expires.get(key, 0.0) > now for key in keys]

    async def remember(self, keys: Sequence[str]) -> None:
        now, expires = time.monotonic(), self._expires
        while expires and next(iter(expires.values())) <= now:
            expires.popitem(last=False)
        for key in keys:
            if key not in expires:  # the window runs from the first time it was handled
                expires[key] = now + self._window
        if len(expires) > self._entries:
            if not self._warned:
                self._warned = True
                _log.warning(
                    "dedupe keeps the last %d events in memory and forgets older ones within "
                    "the window: set dedupe_store to an SQLite file or redis:// to keep more",
                    self._entries,
                )
            while len(expires) > self._entries:
                expires.popitem(last=False)

    async def close(self) -> None:
        self._expires.clear()


class _SQLiteStore:
    """One file in WAL mode, used by one worker thread (an fsync never blocks the loop)."""

    def __init__(self, path: Path, window: float) -> None:
        self._window, self._path = window, path
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="cdk-dedupe")
        self._since_sweep = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            for statement in _SCHEMA:
                self._db.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            self._thread.shutdown()
            raise DedupeError(f"cannot open the dedupe store {path}: {exc}") from None

    async def _run(self, function: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, function, *args)
        except sqlite3.Error as exc:
            raise DedupeError(f"dedupe store {self._path}: {exc}") from None

    async def seen(self, keys: Sequence[str]) -> list[bool]:
        found: set[str] = await self._run(self._select, list(keys), time.time())
        return [key in found for key in keys]

    def _select(self, keys: list[str], now: float) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(keys), _SQLITE_CHUNK):
            chunk = keys[start : start + _SQLITE_CHUNK]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT key FROM dedupe WHERE expires > ? AND key IN ({marks})"
            found.update(row[0] for row in self._db.execute(sql, (now, *chunk)))
        return found

    async def remember(self, keys: Sequence[str]) -> None:
        await self._run(self._insert, list(keys), time.time())

    def _insert(self, keys: list[str], now: float) -> None:
        expires = now + self._window
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT INTO dedupe VALUES (?, ?) ON CONFLICT (key) DO UPDATE"
                " SET expires = excluded.expires WHERE expires <= ?",
                [(key, expires, now) for key in keys],
            )
            self._since_sweep += len(keys)
            if self._since_sweep >= _SWEEP_EVERY:
                self._since_sweep = 0
                db.execute("DELETE FROM dedupe WHERE expires <= ?", (now,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        await self._run(self._db.close)
        self._thread.shutdown()


class _RedisStore:
    """Keys shared by every replica: ``SET key 1 NX PX window`` once handled, ``MGET`` to look."""

    def __init__(self, url: str, window: float, namespace: str) -> None:
        import redis.asyncio  # the optional `redis` extra: imported only when used

        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._client = redis.asyncio.Redis.from_url(
            url, socket_timeout=_REDIS_TIMEOUT, socket_connect_timeout=_REDIS_TIMEOUT
        )
        self._prefix = f"cdk:dedupe:{namespace}:"
        self._milliseconds = max(1, round(window * 1000))

    async def seen(self, keys: Sequence[str]) -> list[bool]:
        prefix = self._prefix
        try:
            values = await self._client.mget([prefix + key for key in keys])
        except self._errors as exc:
            raise DedupeError(f"dedupe store redis: {exc}") from None
        return [value is not None for value in values]

    async def remember(self, keys: Sequence[str]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(self._prefix + key, b"1", nx=True, px=self._milliseconds)
                await pipe.execute()
        except self._errors as exc:
            raise DedupeError(f"dedupe store redis: {exc}") from None

    async def close(self) -> None:
        await self._client.aclose()


class Dedupe:
    """Looks up and remembers events by :func:`dedupe_key`; a failing store is logged once
    (and when it works again), and treated as having seen nothing."""

    def __init__(self, store: _Store, shown: str) -> None:
        self.shown = shown
        self._store = store
        self._failing = False

    async def fresh(self, events: Sequence[E]) -> list[E]:
        """The events of ``events`` not handled within the window, in order."""
        try:
            seen = await self._store.seen([dedupe_key(event) for event in events])
        except DedupeError as exc:
            self._failed(exc)
            return list(events)
        self._works()
        return [event for event, known in zip(events, seen, strict=True) if not known]

    async def remember(self, events: Sequence[AnyCloudEvent]) -> None:
        try:
            await self._store.remember([dedupe_key(event) for event in events])
        except DedupeError as exc:
            self._failed(exc)
        else:
            self._works()

    async def close(self) -> None:
        try:
            await self._store.close()
        except DedupeError as exc:
            _log.warning("closing the dedupe store failed: %s", exc)

    def _failed(self, error: DedupeError) -> None:
        if not self._failing:
            self._failing = True
            _log.warning("%s; events go to arrived unfiltered until it works again", error)

    def _works(self) -> None:
        if self._failing:
            self._failing = False
            _log.info("dedupe store %s works again", self.shown)


def open_dedupe(window: float, store: str | None, namespace: str) -> Dedupe | None:
    """The dedupe of a sink (None when ``window`` is 0); ``namespace`` (the sink's name)
    keeps the keys of different sinks sharing one Redis apart."""
    if window <= 0:
        return None
    if store is None:
        return Dedupe(_MemoryStore(window), "memory")
    if store.startswith("redis://"):
        return Dedupe(_RedisStore(store, window, namespace), redact_url(store))
    return Dedupe(_SQLiteStore(Path(store), window), store)
