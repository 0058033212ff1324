"""etcd: positions kept in an etcd v3 cluster, and one leader among a source's replicas.

Imported only for an ``etcd[s]://`` ``position_store``: other connectors never load etcd3gw.
:class:`EtcdBackend` keeps :class:`cdk.PositionStore` values under ``PREFIX/<namespace>/<key>``;
:class:`Leadership` holds ``PREFIX/<namespace>.leader`` with a lease, and a store bound to it
writes only while this replica's leader key stands (a deposed leader's late write is refused).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import orjson
import requests
from etcd3gw import exceptions as gw
from etcd3gw.client import Etcd3Client
from etcd3gw.lease import Lease

from cdk.config import parse_etcd_url
from cdk.store import NotLeader, StoreError

if TYPE_CHECKING:
    from cdk.config import SourceConfig

__all__ = ["EtcdBackend", "Leadership"]

T = TypeVar("T")
_Call = Callable[[Etcd3Client], T]  # a request, made with the client of one endpoint
log = logging.getLogger("cdk.etcd")

#: Seconds one store request to one endpoint may take before the next one is tried.
REQUEST_TIMEOUT = 5.0
#: "This endpoint cannot serve now", so the next one is tried: no connection, a timeout,
#: a 5xx (its member has no quorum or no leader). Other errors are etcd refusing the request.
_UNREACHABLE = (
    requests.RequestException,
    gw.ConnectionFailedError,
    gw.ConnectionTimeoutError,
    gw.InternalServerError,
)


class Access(NamedTuple):
    """What reaching etcd takes besides its URL: a login when auth is on, CAs for etcds://."""

    login: tuple[str, str] | None = None
    ca_file: str | None = None

    @classmethod
    def from_config(cls, config: SourceConfig) -> Access:
        user, password = config.etcd_username, config.etcd_password
        secret = "" if password is None else password.get_secret_value()
        return cls(None if user is None else (user, secret), config.etcd_ca_file)


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _reason(exc: Exception) -> str:
    """What etcd (or the network) said, without the gateway's JSON wrapping."""
    detail = str(getattr(exc, "detail_text", None) or exc) or type(exc).__name__
    with contextlib.suppress(orjson.JSONDecodeError, TypeError, KeyError):
        return str(orjson.loads(detail)["message"])
    # requests nests the cause deep in its message: keep "[Errno 111] Connection refused".
    found = re.search(r"\[Errno [^]]*\][^'\")]*|timed out", detail)
    return found.group() if found else detail


class _Cluster:
    """One client per etcd endpoint; a call sticks to the one that last answered, moving on when it
    cannot be reached. Calls take turns (one lock), each bounded by ``timeout`` per endpoint."""

    def __init__(self, url: str, access: Access | None, timeout: float) -> None:
        tls, endpoints, self.prefix = parse_etcd_url(url)
        self.url = url
        login, ca_file = access or Access()
        self._login = None if login is None else {"name": login[0], "password": login[1]}
        # With api_path given, no client probes the version (the /v3 gateway: etcd >= 3.4).
        scheme = "https" if tls else "http"
        self._clients = [
            Etcd3Client(host, port, scheme, ca_file, timeout=timeout, api_path="/v3/")
            for host, port in endpoints
        ]
        for client in self._clients:  # else $REQUESTS_CA_BUNDLE would win over ca_file
            client.session.trust_env = ca_file is None
        self._current = 0
        self._lock = threading.Lock()

    def call(self, request: _Call[T]) -> T:
        with self._lock:
            failures = []
            for index in [*range(self._current, len(self._clients)), *range(self._current)]:
                client = self._clients[index]
                try:
                    result = self._attempt(client, request)
                except _UNREACHABLE as exc:
                    failures.append(f"{client.host}:{client.port}: {_reason(exc)}")
                    continue
                except gw.Etcd3Exception as exc:
                    raise StoreError(f"position store {self.url}: {_reason(exc)}") from None
                self._current = index
                return result
            tried = "; ".join(failures)
            raise StoreError(f"position store {self.url}: no endpoint answered ({tried})")

    def _attempt(self, client: Etcd3Client, request: _Call[T], again: bool = False) -> T:
        if self._login is not None and (again or "Authorization" not in client.session.headers):
            answer = client.post(client.get_url("/auth/authenticate"), json=self._login)
            client.session.headers["Authorization"] = answer["token"]
        try:
            return request(client)
        except gw.Etcd3Exception as exc:
            if again or self._login is None or "auth token" not in _reason(exc):
                raise
        return self._attempt(client, request, again=True)  # the token expired: sign in again

    def close(self) -> None:
        for client in self._clients:
            client.session.close()


class EtcdBackend:
    """:class:`cdk.PositionStore`'s etcd backend; with ``leadership``, writes are fenced."""

    def __init__(
        self, url: str, leadership: Leadership | None = None, access: Access | None = None
    ) -> None:
        self._cluster = _Cluster(url, access, REQUEST_TIMEOUT)
        self.leadership = leadership
        # A wrong address or password fails now, at start, not at the first write.
        self._cluster.call(lambda client: client.get(self._cluster.prefix + "/"))

    def get(self, namespace: str, key: str) -> bytes | None:
        values = self._cluster.call(lambda client: client.get(self._key(namespace, key)))
        return values[0] if values else None

    def set(self, namespace: str, key: str, value: bytes) -> None:
        self._write({"request_put": {"key": _b64(self._key(namespace, key)), "value": _b64(value)}})

    def delete(self, namespace: str, key: str) -> None:
        self._write({"request_delete_range": {"key": _b64(self._key(namespace, key))}})

    def close(self) -> None:
        self._cluster.close()

    def _key(self, namespace: str, key: str) -> bytes:
        return f"{self._cluster.prefix}/{namespace}/{key}".encode()

    def _write(self, operation: dict[str, Any]) -> None:
        compare = [] if self.leadership is None else self.leadership.fence()
        txn = {"compare": compare, "success": [operation], "failure": []}
        answer = self._cluster.call(lambda client: client.transaction(txn))
        if self.leadership is not None and not answer.get("succeeded"):
            self.leadership.deposed("etcd refused a fenced write: another replica leads")
            raise NotLeader(f"position not written: {self.leadership.identity} no longer leads")


class Leadership:
    """One leader among the replicas of a source sharing an etcd ``url`` and ``namespace``.

    ``await campaign()`` returns once this replica leads (waiting while another does, retrying while
    etcd is out of reach); it may be awaited again after a loss. ``await lost()`` returns when the
    lease may be lost (at once when not leading); ``await resign()`` revokes the lease: another
    replica may take over at once. The leader renews every quarter lease and stops leading 3/4 of a
    lease after sending its last renewal (monotonic: a pause counts), before etcd can expire it.
    """

    def __init__(
        self, url: str, namespace: str, lease: float = 10.0, access: Access | None = None
    ) -> None:
        self.lease = lease
        self._cluster = _Cluster(url, access, min(lease / 4, REQUEST_TIMEOUT))
        self.key = f"{self._cluster.prefix}/{namespace}.leader"
        #: What the leader key holds while this replica leads, for people looking.
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self._lease_id: int | None = None
        self._revision = 0  # the leader key's create revision in this replica's term
        self._deadline = 0.0  # monotonic time from which the lease may be gone on etcd
        self._term: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(cls, config: SourceConfig, namespace: str) -> Leadership:
        access = Access.from_config(config)
        return cls(str(config.position_store), namespace, config.leader_lease, access)

    @property
    def is_leader(self) -> bool:
        return self._lease_id is not None and time.monotonic() < self._deadline

    @property
    def deadline(self) -> float:
        """The ``time.monotonic()`` from which this replica's lease may be gone on etcd: 3/4 of a
        lease after its last successful renewal (or grant) was sent; 0 when not leading."""
        return self._deadline if self._lease_id is not None else 0.0

    def gate(self, tuples: Sequence[object] = ()) -> str | None:
        """:data:`cdk.delivery.Gate`: nothing may be sent once the lease may have expired."""
        if self.is_leader:
            return None
        return f"the lease of {self.identity} on {self.key} may have expired"

    async def campaign(self) -> None:
        while not self.is_leader and not await self._try_to_lead():
            await asyncio.sleep(self.lease / 8)  # how soon a vacant key is noticed

    async def lost(self) -> None:
        if self._term is not None:
            await asyncio.shield(self._term)

    async def resign(self) -> None:
        self._lose("resigned", logging.INFO)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def fence(self) -> list[dict[str, Any]]:
        """The comparison a fenced etcd write carries; raises NotLeader when not leading."""
        if not self.is_leader:
            raise NotLeader(f"position not written: {self.identity} does not lead {self.key}")
        return [{"key": _b64(self.key), "target": "CREATE", "create_revision": self._revision}]

    def deposed(self, reason: str) -> None:
        """etcd says another replica leads; safe to call from any thread."""
        if self._term is not None:
            self._term.get_loop().call_soon_threadsafe(self._lose, reason)

    async def _run(self, request: _Call[T]) -> T:
        return await asyncio.to_thread(self._cluster.call, request)

    async def _try_to_lead(self) -> bool:
        try:
            if await self._run(lambda client: client.get(self.key)):
                return False  # another replica leads
            sent = time.monotonic()
            lease = await self._run(lambda client: client.lease(math.ceil(self.lease)).id)
            put = {"key": _b64(self.key), "value": _b64(self.identity), "lease": lease}
            vacant = [{"key": _b64(self.key), "target": "CREATE", "create_revision": 0}]
            txn = {"compare": vacant, "success": [{"request_put": put}], "failure": []}
            answer = await self._run(lambda client: client.transaction(txn))
        except StoreError as exc:
            log.warning("campaign for %s: %s", self.key, exc)
            return False
        if not answer.get("succeeded"):
            self._spawn(self._revoke(lease))  # another replica was quicker
            return False
        self._lease_id, self._revision = lease, int(answer["header"]["revision"])
        self._deadline = sent + self.lease * 3 / 4
        self._term = asyncio.get_running_loop().create_future()
        self._spawn(self._renew(lease))
        log.info("%s leads %s", self.identity, self.key)
        return True

    async def _renew(self, lease: int) -> None:
        while self._lease_id == lease:
            sent = time.monotonic()
            renewal = self._run(lambda client: Lease(lease, client).refresh())
            try:
                if await asyncio.wait_for(renewal, self._deadline - sent) <= 0:
                    self._lose("the lease expired on etcd")  # this task ends cancelled
                self._deadline = sent + self.lease * 3 / 4
                await asyncio.sleep(self.lease / 4)
            except (StoreError, TimeoutError) as exc:
                if time.monotonic() >= self._deadline:
                    self._lose(f"lease not renewed in time: {str(exc) or 'timed out'}")
                await asyncio.sleep(self.lease / 16)  # try again soon, until the deadline

    def _lose(self, reason: str, level: int = logging.WARNING) -> None:
        lease, self._lease_id = self._lease_id, None
        if lease is None:
            return
        log.log(level, "%s no longer leads %s: %s", self.identity, self.key, reason)
        if self._term is not None and not self._term.done():
            self._term.set_result(None)
        for task in self._tasks:
            task.cancel()  # the renewal (and revocations of leases never used)
        # Revoking frees the key for the others now rather than when the lease expires
        # (a paused replica's lease may still be alive); when etcd is out of reach it fails.
        self._spawn(self._revoke(lease))

    async def _revoke(self, lease: int) -> None:
        with contextlib.suppress(StoreError):
            await self._run(lambda client: Lease(lease, client).revoke())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
