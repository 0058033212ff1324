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
import random
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, Self, TypeVar

import orjson
import requests
from etcd3gw import exceptions as gw
from etcd3gw.client import Etcd3Client
from etcd3gw.lease import Lease

from cdk.config import parse_etcd_url
from cdk.store import InUse, NotLeader, StoreError

if TYPE_CHECKING:
    from cdk.config import SourceConfig

__all__ = ["EtcdBackend", "Leadership", "PartitionLeases"]

T = TypeVar("T")
_Call = Callable[[Etcd3Client], T]  # a request, made with the client of one endpoint
log = logging.getLogger("cdk.etcd")

#: Seconds one store request to one endpoint may take before the next one is tried.
REQUEST_TIMEOUT = 5.0
#: Seconds a killed connector's "running" key outlives it (changes by hand wait that long).
CLAIM_LEASE = 10
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


class Fence(Protocol):
    """What fences a store's writes: :class:`Leadership`, or :class:`PartitionLeases` (where the
    key written is the partition's name)."""

    identity: str

    def fence(self, key: str) -> list[dict[str, Any]]: ...  # raises NotLeader when not leading
    def deposed(self, reason: str, key: str) -> None: ...  # etcd refused a fenced write


class EtcdBackend:
    """:class:`cdk.PositionStore`'s etcd backend; with ``leadership``, writes are fenced."""

    def __init__(
        self, url: str, leadership: Fence | None = None, access: Access | None = None
    ) -> None:
        self._cluster = _Cluster(url, access, REQUEST_TIMEOUT)
        self.leadership = leadership
        self._claim: int | None = None  # the lease of this connector's "running" key
        # A wrong address or password fails now, at start, not at the first write.
        self._cluster.call(lambda client: client.get(self._cluster.prefix + "/"))

    def get(self, namespace: str, key: str) -> bytes | None:
        values = self._cluster.call(lambda client: client.get(self._key(namespace, key)))
        return values[0] if values else None

    def set(self, namespace: str, key: str, value: bytes) -> None:
        put = {"key": _b64(self._key(namespace, key)), "value": _b64(value)}
        self._write({"request_put": put}, key)

    def delete(self, namespace: str, key: str) -> None:
        self._write({"request_delete_range": {"key": _b64(self._key(namespace, key))}}, key)

    def keys(self, namespace: str) -> list[str]:
        start = self._key(namespace, "")
        found = self._cluster.call(lambda client: client.get_prefix(start.decode()))
        return [meta["key"].decode()[len(start) :] for _, meta in found]

    # A running connector keeps ``PREFIX/<namespace>.running/<identity>`` alive on a lease
    # (renewed by a thread of its own); a change by hand is refused while any such key stands.
    def claim(self, namespace: str) -> None:
        key = f"{self._cluster.prefix}/{namespace}.running/{socket.gethostname()}:{os.getpid()}"
        lease = self._cluster.call(lambda client: client.lease(CLAIM_LEASE).id)
        self._cluster.call(lambda client: client.put(key, "running", Lease(lease, client)))
        self._claim = lease
        threading.Thread(target=self._keep_claim, args=(lease,), daemon=True).start()

    def exclusive(self, namespace: str) -> None:
        start = f"{self._cluster.prefix}/{namespace}.running/"
        running = self._cluster.call(lambda client: client.get_prefix(start))
        if running:
            who = ", ".join(meta["key"].decode()[len(start) :] for _, meta in running)
            raise InUse(f"{self._cluster.url}: a connector runs against it ({who}): stop it first")

    def _keep_claim(self, lease: int) -> None:
        while self._claim == lease:
            time.sleep(CLAIM_LEASE / 3)
            with contextlib.suppress(StoreError):
                if self._claim == lease:
                    self._cluster.call(lambda client: Lease(lease, client).refresh())

    def close(self) -> None:
        lease, self._claim = self._claim, None
        if lease is not None:  # the key goes now, not when the lease runs out
            with contextlib.suppress(StoreError):
                self._cluster.call(lambda client: Lease(lease, client).revoke())
        self._cluster.close()

    def _key(self, namespace: str, key: str) -> bytes:
        return f"{self._cluster.prefix}/{namespace}/{key}".encode()

    def _write(self, operation: dict[str, Any], key: str) -> None:
        compare = [] if self.leadership is None else self.leadership.fence(key)
        txn = {"compare": compare, "success": [operation], "failure": []}
        answer = self._cluster.call(lambda client: client.transaction(txn))
        if self.leadership is not None and not answer.get("succeeded"):
            self.leadership.deposed("etcd refused a fenced write: another replica leads", key)
            raise NotLeader(f"position not written: {self.leadership.identity} no longer leads")


class _Leased:
    """What holding an etcd lease takes: its grant, renewal every quarter lease, and a deadline.

    The deadline is 3/4 of a lease after the last successful renewal (or the grant) was *sent*,
    on this process's monotonic clock (a pause counts): etcd counts the lease from when that
    request arrived, so this replica lets go before etcd can expire the lease and let another
    replica in. The quarter lease left covers clocks that drift and requests on their way.
    """

    def __init__(
        self,
        url: str,
        namespace: str,
        lease: float = 10.0,
        access: Access | None = None,
        identity: str | None = None,
    ) -> None:
        self.namespace, self.lease = namespace, lease
        self._cluster = _Cluster(url, access, min(lease / 4, REQUEST_TIMEOUT))
        #: What this replica's keys hold, for people looking.
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self._lease_id: int | None = None
        self._deadline = 0.0  # monotonic time from which the lease may be gone on etcd
        self._tasks: set[asyncio.Task[None]] = set()  # the renewal, revocations

    @classmethod
    def from_config(cls, config: SourceConfig, namespace: str) -> Self:
        access = Access.from_config(config)
        return cls(str(config.position_store), namespace, config.leader_lease, access)

    @property
    def deadline(self) -> float:
        """The ``time.monotonic()`` from which this replica's lease may be gone on etcd: 3/4 of a
        lease after its last successful renewal (or grant) was sent; 0 when it holds none."""
        return self._deadline if self._lease_id is not None else 0.0

    def _holding(self) -> bool:
        return self._lease_id is not None and time.monotonic() < self._deadline

    async def _run(self, request: _Call[T]) -> T:
        return await asyncio.to_thread(self._cluster.call, request)

    async def _grant(self) -> int:
        """A new lease (its deadline counted from now); renew it until :meth:`_lose`."""
        sent = time.monotonic()
        lease: int = await self._run(lambda client: client.lease(math.ceil(self.lease)).id)
        self._deadline = sent + self.lease * 3 / 4
        return lease

    def _hold(self, lease: int) -> None:
        self._lease_id = lease
        self._spawn(self._renew(lease))

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
        raise NotImplementedError

    def _let_go(self) -> int | None:
        """Hold the lease no more: stop renewing it and revoke it; the lease it was, if any."""
        lease, self._lease_id = self._lease_id, None
        if lease is None:
            return None
        for task in self._tasks:
            task.cancel()  # the renewal (and revocations of leases never used)
        # Revoking frees the keys for the others now rather than when the lease expires
        # (a paused replica's lease may still be alive); when etcd is out of reach it fails.
        self._spawn(self._revoke(lease))
        return lease

    async def _revoke(self, lease: int) -> None:
        with contextlib.suppress(StoreError):
            await self._run(lambda client: Lease(lease, client).revoke())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Leadership(_Leased):
    """One leader among the replicas of a source sharing an etcd ``url`` and ``namespace``.

    ``await campaign()`` returns once this replica leads (waiting while another does, retrying while
    etcd is out of reach); it may be awaited again after a loss. ``await lost()`` returns when the
    lease may be lost (at once when not leading); ``await resign()`` revokes the lease: another
    replica may take over at once. The leader renews every quarter lease and stops leading 3/4 of a
    lease after sending its last renewal (monotonic: a pause counts), before etcd can expire it;
    :meth:`gate` closes deliveries at that moment.
    """

    _revision = 0  # the leader key's create revision in this replica's term
    _term: asyncio.Future[None] | None = None

    @property
    def key(self) -> str:
        """The leader key: ``PREFIX/<namespace>.leader``."""
        return f"{self._cluster.prefix}/{self.namespace}.leader"

    @property
    def is_leader(self) -> bool:
        return self._holding()

    def gate(self, tuples: Sequence[object] = ()) -> str | None:
        """:data:`cdk.delivery.Gate`: nothing may be sent once the lease may have expired."""
        if self._holding():
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

    def fence(self, key: str = "") -> list[dict[str, Any]]:
        """The comparison a fenced etcd write (of any ``key``) carries; raises NotLeader when
        not leading."""
        if not self.is_leader:
            raise NotLeader(f"position not written: {self.identity} does not lead {self.key}")
        return _fence(self.key, self._revision)

    def deposed(self, reason: str, key: str = "") -> None:
        """etcd says another replica leads; safe to call from any thread."""
        if self._term is not None:
            self._term.get_loop().call_soon_threadsafe(self._lose, reason)

    async def _try_to_lead(self) -> bool:
        try:
            if await self._run(lambda client: client.get(self.key)):
                return False  # another replica leads
            lease = await self._grant()
            vacant = _create(self.key, self.identity, lease)
            answer = await self._run(lambda client: client.transaction(vacant))
        except StoreError as exc:
            log.warning("campaign for %s: %s", self.key, exc)
            return False
        if not answer.get("succeeded"):
            self._spawn(self._revoke(lease))  # another replica was quicker
            return False
        self._revision = int(answer["header"]["revision"])
        self._hold(lease)
        self._term = asyncio.get_running_loop().create_future()
        log.info("%s leads %s", self.identity, self.key)
        return True

    def _lose(self, reason: str, level: int = logging.WARNING) -> None:
        if self._let_go() is None:
            return
        log.log(level, "%s no longer leads %s: %s", self.identity, self.key, reason)
        if self._term is not None and not self._term.done():
            self._term.set_result(None)


def _fence(key: str, revision: int) -> list[dict[str, Any]]:
    """The comparison of a write fenced by ``key``: it still is the one created at ``revision``."""
    return [{"key": _b64(key), "target": "CREATE", "create_revision": revision}]


def _create(key: str, identity: str, lease: int) -> dict[str, Any]:
    """The transaction that creates ``key`` (holding ``identity``) on ``lease`` if it is absent."""
    put = {"key": _b64(key), "value": _b64(identity), "lease": lease}
    vacant = [{"key": _b64(key), "target": "CREATE", "create_revision": 0}]
    return {"compare": vacant, "success": [{"request_put": put}], "failure": []}


def _range(prefix: str) -> dict[str, Any]:
    """A range request for every key under ``prefix`` (which ends with ``/``)."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return {"request_range": {"key": _b64(prefix), "range_end": _b64(end)}}


def _kvs(answer: Any, index: int, prefix: str) -> dict[str, dict[str, Any]]:
    """The keys (``prefix`` cut off) and records the ``index``-th range of a transaction found."""
    found = answer.get("responses", [])[index].get("response_range", {}).get("kvs", [])
    return {base64.b64decode(kv["key"]).decode()[len(prefix) :]: kv for kv in found}


Hook = Callable[[str], Awaitable[None]]


class PartitionLeases(_Leased):
    """The partitions of a source shared out among its live replicas, one leader each.

    A replica joins with one lease: its member key ``PREFIX/<namespace>.members/<identity>``
    and, for each partition it leads, ``PREFIX/<namespace>.partitions/<name>``, created only
    if absent, all on that lease. Every eighth of a lease (and when :meth:`assign` changes the
    list) it reads both in one request and moves toward its fair share: of ``n`` partitions
    and ``m`` members sorted by identity, the first ``n % m`` take ``n // m + 1``, the others
    ``n // m``, so no two shares differ by more than one. Over its share it releases some
    (``on_loss`` first, while it still leads them, then the key goes); under it, it takes
    vacant ones (``on_gain`` once the key is its own). A member that dies leaves with its
    lease, about one lease later; one that cannot renew (cut off, paused) leads nothing from
    its deadline on (:class:`_Leased`), so :meth:`gate` closes before etcd lets another in.
    """

    def __init__(
        self,
        url: str,
        namespace: str,
        lease: float = 10.0,
        access: Access | None = None,
        identity: str | None = None,
        *,
        on_gain: Hook | None = None,
        on_loss: Hook | None = None,
    ) -> None:
        super().__init__(url, namespace, lease, access, identity)
        base = f"{self._cluster.prefix}/{namespace}"
        self.members_prefix, self.partitions_prefix = f"{base}.members/", f"{base}.partitions/"
        #: Awaited once this replica leads a partition: start producing it (from its position
        #: stored now). Awaited once it leads it no more (or is about to release it): stop.
        self.on_gain, self.on_loss = on_gain, on_loss
        self._wanted: tuple[str, ...] = ()
        self._owned: dict[str, int] = {}  # partition -> its key's create revision
        self._releasing: set[str] = set()
        self._ending: dict[str, asyncio.Task[None]] = {}  # on_loss (and release) under way
        self._starting: dict[str, asyncio.Future[None]] = {}  # on_gain under way
        self._balancer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._warned = ""
        #: What the store keys of the partitions' positions start with (fenced by :meth:`fence`).
        self.key_prefix = ""

    @property
    def owned(self) -> frozenset[str]:
        """The partitions this replica leads now, by its own clock."""
        return frozenset(self._owned) if self._holding() else frozenset()

    def deadline_of(self, partition: str) -> float:
        """The ``time.monotonic()`` from which the lease on ``partition`` may be gone; 0 when
        this replica does not lead it."""
        return self.deadline if partition in self._owned else 0.0

    def gate(self, partition: str | None) -> str | None:
        """None while this replica may send events of ``partition`` (None: of a partition not
        known, so while it holds its lease at all); else why not."""
        if self._holding() and (partition is None or partition in self._owned):
            return None
        what = "its lease" if partition is None else f"partition {partition!r}"
        return f"{self.identity} does not lead {what} (its lease may be gone)"

    def fence(self, key: str) -> list[dict[str, Any]]:
        """The comparison of an etcd write of the position ``key`` (:attr:`key_prefix` and a
        partition's name), fenced by that partition's leader key."""
        partition = key.removeprefix(self.key_prefix)
        reason = self.gate(partition)
        if reason is not None:
            raise NotLeader(f"position not written: {reason}")
        return _fence(self.partitions_prefix + partition, self._owned[partition])

    def deposed(self, reason: str, key: str) -> None:
        """etcd refused a write fenced by the partition of ``key``: another replica leads it
        now; safe to call from any thread."""
        if self._balancer is not None:
            partition = key.removeprefix(self.key_prefix)
            self._balancer.get_loop().call_soon_threadsafe(self._end, partition, reason)

    def assign(self, partitions: Iterable[str]) -> None:
        """The source's partitions now (in order); those no longer listed are released."""
        wanted = tuple(dict.fromkeys(partitions))
        if wanted != self._wanted:
            self._wanted = wanted
            self._wake.set()

    async def start(self) -> None:
        """Join, and keep balancing until :meth:`stop`."""
        if self._balancer is None:
            self._balancer = asyncio.create_task(self._balance_forever(), name="cdk-partitions")

    async def stop(self) -> None:
        """Release every partition (``on_loss`` each), then leave: the others take them at once."""
        if self._balancer is not None:
            self._balancer.cancel()
            await asyncio.wait({self._balancer})
        for partition in list(self._owned):
            self._release(partition)
        await asyncio.gather(*self._ending.values(), return_exceptions=True)
        self._lose("stopped", logging.INFO)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _balance_forever(self) -> None:
        while True:
            try:
                if self._lease_id is None:
                    await self._join()
                await self._balance()
                self._warned = ""
            except StoreError as exc:
                if str(exc) != self._warned:  # once per cause, not every eighth of a lease
                    log.warning("partitions of %s: %s", self.partitions_prefix, exc)
                    self._warned = str(exc)
            except Exception:  # a bug (or an answer etcd never gives): balance again later
                log.exception("balancing the partitions of %s failed", self.partitions_prefix)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.lease / 8)

    async def _join(self) -> None:
        lease = await self._grant()
        key = self.members_prefix + self.identity
        put = {"key": _b64(key), "value": _b64(self.identity), "lease": lease}
        self._hold(lease)
        await self._run(lambda client: client.transaction({"success": [{"request_put": put}]}))

    async def _balance(self) -> None:
        txn = {"success": [_range(self.members_prefix), _range(self.partitions_prefix)]}
        answer = await self._run(lambda client: client.transaction(txn))
        members = sorted(_kvs(answer, 0, self.members_prefix))
        holders = _kvs(answer, 1, self.partitions_prefix)
        lease = self._lease_id
        if lease is None or not self._holding():
            return  # the renewal says what happened
        if self.identity not in members:
            self._lose("its member key is gone from etcd")
            return
        for partition, revision in list(self._owned.items()):
            held = holders.get(partition)
            if held is None or int(held.get("create_revision", 0)) != revision:
                self._end(partition, "its key was deleted or taken over")
        wanted = self._wanted
        count, index = len(wanted), members.index(self.identity)
        share = count // len(members) + (index < count % len(members))
        mine = [p for p in self._owned if p not in self._releasing]
        for partition in mine:
            if partition not in wanted:
                self._release(partition)
        mine = [p for p in wanted if p in mine]
        for partition in mine[share:]:  # the last ones in the source's order
            self._release(partition)
        vacant = [p for p in wanted if p not in holders and p not in self._ending]
        random.shuffle(vacant)  # replicas under their share do not all race for the same key
        for partition in vacant[: max(0, share - len(mine))]:
            await self._take(partition, lease)

    async def _take(self, partition: str, lease: int) -> None:
        key = self.partitions_prefix + partition
        txn = _create(key, self.identity, lease)
        answer = await self._run(lambda client: client.transaction(txn))
        if not answer.get("succeeded") or self._lease_id != lease:
            return  # another replica was quicker, or this lease is gone meanwhile
        self._owned[partition] = int(answer["header"]["revision"])
        log.info("%s leads partition %r", self.identity, partition)
        if self.on_gain is None:
            return
        starting = self._starting[partition] = asyncio.get_running_loop().create_future()
        try:
            await self.on_gain(partition)
        except Exception:
            log.exception("starting partition %r failed; releasing it", partition)
            self._release(partition)
        finally:
            del self._starting[partition]
            starting.set_result(None)

    def _release(self, partition: str) -> None:
        """Stop leading ``partition`` of this replica's own will: ``on_loss``, then the key."""
        if partition in self._releasing or partition not in self._owned:
            return
        self._releasing.add(partition)
        self._ending[partition] = asyncio.create_task(self._hand_over(partition))

    async def _hand_over(self, partition: str) -> None:
        try:
            await self._stop_partition(partition)  # it still leads: what is held is sent
        finally:
            revision = self._owned.pop(partition, None)  # the gate closes before the key goes
            self._releasing.discard(partition)
            del self._ending[partition]
        if revision is None or self._lease_id is None:
            return  # the whole lease went meanwhile: its keys with it
        key = _b64(self.partitions_prefix + partition)
        delete = {"request_delete_range": {"key": key}}
        txn = {"compare": _fence(self.partitions_prefix + partition, revision), "success": [delete]}
        with contextlib.suppress(StoreError):  # else it goes with the lease
            await self._run(lambda client: client.transaction(txn))
        log.info("%s released partition %r", self.identity, partition)

    def _end(self, partition: str, reason: str) -> None:
        """``partition`` is led no more (the gate closed first): ``on_loss``, nothing else."""
        if self._owned.pop(partition, None) is None:
            return
        log.warning("%s no longer leads partition %r: %s", self.identity, partition, reason)
        if partition not in self._releasing:
            task = asyncio.create_task(self._stop_partition(partition))
            self._ending[partition] = task
            task.add_done_callback(lambda _: self._ending.pop(partition, None))

    async def _stop_partition(self, partition: str) -> None:
        """``on_loss``, once the ``on_gain`` of the same partition, if under way, returned."""
        starting = self._starting.get(partition)
        if starting is not None:
            await asyncio.shield(starting)
        if self.on_loss is None:
            return
        try:
            await self.on_loss(partition)
        except Exception:
            log.exception("stopping partition %r failed", partition)

    def _lose(self, reason: str, level: int = logging.WARNING) -> None:
        if self._let_go() is None:
            return
        log.log(
            level, "%s leads no partition of %s: %s", self.identity, self.partitions_prefix, reason
        )
        for partition in list(self._owned):
            self._end(partition, "the lease is gone")
        self._wake.set()  # join again
