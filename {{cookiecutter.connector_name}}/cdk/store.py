"""The position store: JSON values by key that a polling source keeps across restarts.

:class:`PositionStore` keeps them in memory, in SQLite or (``cdk.etcd``) in etcd; what is
written when is ``cdk.positions``' business (:class:`cdk.Checkpoint`).
"""

from __future__ import annotations

import os
import sqlite3
import threading

try:
    import fcntl
except ImportError:  # Windows: no flock; a change by hand is not guarded there
    fcntl = None  # type: ignore[assignment]
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from orjson import OPT_PASSTHROUGH_DATACLASS, OPT_PASSTHROUGH_DATETIME, OPT_PASSTHROUGH_SUBCLASS

from cdk.config import ETCD_SCHEMES

if TYPE_CHECKING:
    from cdk.config import SourceConfig
    from cdk.etcd import Fence

__all__ = ["InUse", "NotLeader", "PositionStore", "StoreError", "dumps"]

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


class InUse(StoreError):
    """The store cannot be changed by hand: a connector runs against it now."""


class _Backend(Protocol):
    def get(self, namespace: str, key: str) -> bytes | None: ...
    def set(self, namespace: str, key: str, value: bytes) -> None: ...
    def delete(self, namespace: str, key: str) -> None: ...
    def keys(self, namespace: str) -> list[str]: ...
    # A running connector claims the store until close; ``exclusive`` raises InUse meanwhile.
    def claim(self, namespace: str) -> None: ...
    def exclusive(self, namespace: str) -> None: ...
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
        self._flocked: int | None = None  # a descriptor of the file holding a flock
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

    def keys(self, namespace: str) -> list[str]:
        with self._lock:
            sql = "SELECT key FROM positions WHERE namespace = ? ORDER BY key"
            return [str(row[0]) for row in self._db.execute(sql, (namespace,))]

    # flock, not fcntl locks: those are SQLite's own, and closing any descriptor of the
    # file would drop them. A shared flock per running connector, an exclusive one for a
    # change by hand; the kernel drops them when the process dies, even by kill -9.
    def claim(self, namespace: str) -> None:
        if fcntl is not None:
            self._flock(fcntl.LOCK_SH)

    def exclusive(self, namespace: str) -> None:
        if fcntl is None:
            return
        try:
            self._flock(fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InUse(f"{self.path} is in use by a running connector: stop it first") from None

    def _flock(self, operation: int) -> None:
        if self.path is None or self._flocked is not None or fcntl is None:
            return
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, operation)
        except BaseException:
            os.close(descriptor)
            raise
        self._flocked = descriptor

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._flocked is not None:
                os.close(self._flocked)  # releases the flock
                self._flocked = None

    def _run(self, sql: str, params: tuple[str, ...]) -> Any:
        with self._lock:  # fetchone() too steps the statement on the shared connection
            try:
                return self._db.execute(sql, params).fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"position store {self.path}: {exc}") from None


class PositionStore:
    """JSON values by key for one connector (``namespace``): in memory for ``path`` None,
    else in that SQLite file (connectors sharing it each see their own namespace) or
    ``etcd://host:2379/prefix``. Calls block: microseconds for SQLite, a round trip for etcd.
    ``read_only`` (a dry run): reads as usual, writes change nothing, a missing SQLite file
    is not created."""

    def __init__(
        self,
        namespace: str,
        path: str | os.PathLike[str] | None = None,
        *,
        backend: _Backend | None = None,
        read_only: bool = False,
    ) -> None:
        if not namespace:
            raise ValueError("PositionStore needs a non-empty namespace (the connector's name)")
        self.namespace = namespace
        self.read_only = read_only
        self._where = "memory" if path is None else os.fspath(path)
        if backend is None and self._where.startswith(ETCD_SCHEMES):
            from cdk.etcd import EtcdBackend  # only etcd users need its client library

            backend = EtcdBackend(self._where)
        self.path = None if path is None or backend else Path(path)
        if backend is None and read_only and self.path is not None and not self.path.exists():
            backend = _SQLiteBackend(None)  # nothing stored yet, and nothing to create
        self._backend = backend or _SQLiteBackend(self.path)
        self._closed = False

    @classmethod
    def from_config(
        cls,
        config: SourceConfig,
        namespace: str,
        leadership: Fence | None = None,
        *,
        read_only: bool = False,
    ) -> PositionStore:
        """The store ``config.position_store`` names; ``leadership`` fences etcd writes."""
        if not str(url := config.position_store).startswith(ETCD_SCHEMES):
            return cls(namespace, url, read_only=read_only)
        from cdk.etcd import Access, EtcdBackend

        backend = EtcdBackend(str(url), leadership, Access.from_config(config))
        return cls(namespace, url, backend=backend, read_only=read_only)

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
        data = dumps(value, key)
        if not self.read_only:
            self._backend_checked().set(self.namespace, key, data)

    def delete(self, key: str) -> None:
        """Forget ``key``; nothing happens when it is not stored."""
        if not self.read_only:
            self._backend_checked().delete(self.namespace, key)

    def stored_keys(self) -> list[str]:
        """The keys stored in this namespace, sorted."""
        return sorted(self._backend_checked().keys(self.namespace))

    def claim(self) -> None:
        """Say that a connector runs against this store, until :meth:`close`: changes by
        hand (:meth:`exclusive`) are refused meanwhile. Memory: nothing to say."""
        if not self.read_only:
            self._backend_checked().claim(self.namespace)

    def exclusive(self) -> None:
        """Make sure no connector runs against this store (and, for SQLite, none starts
        until :meth:`close`); :class:`InUse` when one does."""
        self._backend_checked().exclusive(self.namespace)

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


def dumps(value: Any, name: object) -> bytes:
    """``value`` as JSON bytes; a TypeError names ``name`` when it is no JSON value."""
    try:
        return orjson.dumps(value, option=_DUMP_OPTIONS)
    except TypeError as exc:
        raise TypeError(f"position {name!r} must be a JSON value: {exc}") from None
