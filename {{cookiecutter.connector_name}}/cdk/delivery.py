"""Delivery: drains ``Source.chan`` and POSTs every event to the source's ``target``.

A :class:`Deliverer` runs ``max_in_flight`` workers over one keep-alive connection pool
(:class:`cdk.client.Client`); each takes a due retry, else an event (or a batch, waiting up to
``batch_linger`` for it to fill), and sends it. Every :class:`~cdk.connector.Tuple` gets exactly one
callback: ``success()`` or ``failed(error)``, an error defined here. Retries follow Knative's rules,
with backoff, jitter and ``Retry-After``; a request waiting for one holds no worker unless
``max_in_flight`` is 1 (strict order). The retry window (:meth:`Deliverer._park`) bounds their load
on a failing target; a :class:`DeliveryQueue` counts waiting events against ``queue_size``.
A ``gate`` (:data:`Gate`), asked right before each request is written, keeps a replica whose lease
may have expired from sending: what it holds then fails with :class:`Fenced`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
import os
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from time import time as wall_clock
from typing import Any

import orjson
from cloudevents.core.v1.event import CloudEvent
from pydantic import SecretStr

from cdk import tracing
from cdk.client import Client, ClientError, ClientResponse
from cdk.codec import to_batch, to_binary, to_structured, with_extensions
from cdk.config import DeliveryConfig, redact_url
from cdk.connector import Tuple
from cdk.logs import one_line
from cdk.metrics import Metrics

__all__ = [
    "AttemptsExhausted",
    "Deliverer",
    "DeliveryQueue",
    "EncodeError",
    "Fenced",
    "Gate",
    "ShutdownError",
    "error_extensions",
    "parse_ce_overrides",
    "tls_context",
]

EXCERPT_CHARS = 200
#: Most bytes of the target's answer a dead letter carries in ``knativeerrordata``.
ERROR_DATA_BYTES = 1024
#: Shortest wait between two attempts, whatever the config says: a ``retry_backoff`` of 0
#: would otherwise stay 0 and spin on a target that refuses connections.
_MIN_BACKOFF = 0.01
#: Attempts the target's failing share is averaged over (the weight of an exponential average).
_SHARE_SPAN = 32
_PROBE = CloudEvent({"id": "probe", "source": "/", "type": "probe", "specversion": "1.0"})
_log = logging.getLogger("cdk.delivery")

#: Asked right before a request of ``tuples`` is written: ``None`` lets it go, a reason stops it
#: (:class:`Fenced`). A replica under leader election closes it once its lease may have expired.
Gate = Callable[[Sequence[Tuple]], str | None]


class DeliveryError(Exception):
    """An event was not delivered; ``str()`` says why in words a user can act on."""


class _Answered(DeliveryError):
    """The target answered a status; ``body`` is the start of its answer, secrets masked."""

    _TEXT = ""

    def __init__(
        self, status: int, excerpt: str = "", body: bytes = b"", retry_after: float | None = None
    ) -> None:
        self.status, self.excerpt, self.body, self.retry_after = status, excerpt, body, retry_after
        super().__init__(f"{self._TEXT} {status}" + (f": {excerpt}" if excerpt else ""))


class TargetRejected(_Answered):
    """The target answered a status that is never retried (400, 401, 403, 413, 415, ...)."""

    _TEXT = "target rejected the request with HTTP"


class TargetUnavailable(_Answered):
    """The target answered a status worth retrying (404, 408, 409, 429, 5xx)."""

    _TEXT = "target answered HTTP"


class AttemptsExhausted(DeliveryError):
    """Every one of ``send_event_attempts`` attempts failed; ``last_error`` is the last cause."""

    def __init__(self, attempts: int, last_error: BaseException) -> None:
        self.attempts, self.last_error = attempts, last_error
        super().__init__(f"gave up after {attempts} attempt(s): {_describe(last_error)}")


class ShutdownError(DeliveryError):
    """The connector shut down before the event was delivered (within the grace period)."""

    def __init__(self, message: str, last_error: BaseException | None = None) -> None:
        self.last_error = last_error
        why = "" if last_error is None else f" (last error: {_describe(last_error)})"
        super().__init__(message + why)


class DeadLettered(DeliveryError):
    """The target did not take the event, the dead-letter target did; ``original`` says why."""

    def __init__(self, target: str, original: DeliveryError) -> None:
        self.target, self.original = target, original
        super().__init__(f"sent to the dead-letter target {target}: {original}")


class EncodeError(DeliveryError):
    """The event cannot be written on the wire (it is not a valid CloudEvent)."""


class Fenced(DeliveryError):
    """Not sent by this replica: its lease may have expired, so another one sends the event
    (from the position stored last). Not a loss: a checkpoint treats it as the end of a term."""


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, DeliveryError) else one_line(error)


def _reason(error: BaseException) -> str:
    """The ``reason`` label of ``cdk_events_failed`` for ``error``."""
    error = error.original if isinstance(error, DeadLettered) else error
    reasons = {ShutdownError: "shutdown", AttemptsExhausted: "exhausted", Fenced: "fenced"}
    return reasons.get(type(error), "rejected")


def error_extensions(dest: str, code: int | None = None, data: bytes = b"") -> dict[str, str]:
    """The Knative extensions of a dead letter: where it failed, the status it got, and the
    first :data:`ERROR_DATA_BYTES` of the answer (base64)."""
    extensions = {"knativeerrordest": dest}
    if code is not None:
        extensions["knativeerrorcode"] = str(code)
        if data:
            extensions["knativeerrordata"] = base64.b64encode(data[:ERROR_DATA_BYTES]).decode()
    return extensions


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds (>= 0) a ``Retry-After`` (delta-seconds or HTTP-date) asks; None if unreadable."""
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # asctime has no zone, yet every HTTP-date is GMT (RFC 9110 5.6.7)
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (wall_clock() if now is None else now))


def parse_ce_overrides(text: str | None) -> dict[str, Any]:
    """The extensions ``K_CE_OVERRIDES`` (``{"extensions": {...}}``) sets; empty or absent
    means none. A ``ValueError`` names what is wrong with any other value."""
    if text is None or not text.strip():
        return {}
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"K_CE_OVERRIDES: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError('K_CE_OVERRIDES: must be a JSON object like {"extensions": {...}}')
    # Other keys are ignored: the platform may add fields this kit does not know yet.
    if (extensions := data.get("extensions")) is None:
        return {}
    if not isinstance(extensions, dict):
        raise ValueError('K_CE_OVERRIDES: "extensions" must be a JSON object')
    try:  # the codec's own rules decide what an extension may be named and hold
        with_extensions(_PROBE, extensions)
    except ValueError as exc:
        raise ValueError(f"K_CE_OVERRIDES: {exc}") from None
    return dict(extensions)


def tls_context(config: DeliveryConfig) -> ssl.SSLContext | None:
    """The system's CAs plus ``target_ca_file`` and ``$K_CA_CERTS`` (PEM text, as Knative
    injects it); ``None`` when neither is set, ``ValueError`` when K_CA_CERTS is unreadable."""
    pem = os.environ.get("K_CA_CERTS", "").strip() or None
    if not (pem or config.target_ca_file):
        return None
    context = ssl.create_default_context()
    try:  # target_ca_file was checked when the config was loaded
        context.load_verify_locations(cafile=config.target_ca_file, cadata=pem)
    except (OSError, ValueError) as exc:
        raise ValueError(f"K_CA_CERTS: not PEM certificates ({exc})") from None
    return context


class DeliveryQueue(asyncio.Queue[Tuple]):
    """``Source.chan``, whose ``maxsize`` bounds queued events and those waiting for a retry."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self.waiting, self._size = 0, maxsize  # read on every put: no property in the way

    def full(self) -> bool:
        return 0 < self._size <= self.qsize() + self.waiting

    def hold(self, count: int) -> None:
        """Count ``count`` more events (fewer when negative) as waiting for a retry."""
        self.waiting += count
        for _ in range(-count):  # room freed: wake producers waiting in put(), as get() does
            self._wakeup_next(self._putters)  # type: ignore[attr-defined]

    def take(self, count: int) -> list[Tuple]:
        """Up to ``count`` queued tuples, as that many ``get_nowait()`` calls would return
        them, for a batch: one call instead of two checks and a call per tuple."""
        items = [self._get() for _ in range(min(count, self.qsize()))]
        if self._putters:  # type: ignore[attr-defined]
            for _ in items:
                self._wakeup_next(self._putters)  # type: ignore[attr-defined]
        return items


@dataclass(slots=True, eq=False)
class _Request:
    """Tuples sent together, their request's bytes, and how far their delivery got."""

    tuples: list[Tuple]
    client: Client
    data: bytes = b""
    backoff: float = 0.0
    attempt: int = 0
    started: float = 0.0
    retry_at: float = 0.0
    error: BaseException | None = None
    original: DeliveryError | None = None  # why it goes to the dead-letter target
    timer: asyncio.TimerHandle | None = None
    settled: int = 0  # the leading tuples called back
    delivered: bool = False
    done: bool = False
    cycling: bool = False  # in the retry window
    status: int = 0  # of the last answer
    span: Any = None  # its tracing span, when tracing is on


class Deliverer:
    """Delivers the tuples of a source's ``chan`` to ``config.target`` (see :meth:`run`)."""

    def __init__(
        self,
        config: DeliveryConfig,
        metrics: Metrics,
        overrides: Mapping[str, Any] | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.config, self.metrics, self.log = config, metrics, _log
        self.gate = gate
        self.overrides = dict(overrides) if overrides else None
        self.reminder = 30.0  # the fewest seconds between two warnings that deliveries still fail
        #: Whether the source sends this tuple again when its attempts run out (an outage):
        #: its running out is then the source's to say, once, not a failure per round.
        self.holds: Callable[[Tuple], bool] = lambda item: False
        self._redact = config.redact
        self._shown = self._redact(redact_url(config.target))
        self._dead_shown = self._redact(redact_url(config.dead_letter_target or ""))
        self._tls = tls_context(config)
        self._client = self._new_client(config.target, config.target_auth_token)
        dead, token = config.dead_letter_target, config.dead_letter_auth_token
        self._dead_client = None if dead is None else self._new_client(dead, token)
        self._batch_size = config.batch_size
        self._encode_one = to_structured if config.content_mode == "structured" else to_binary
        self._loop: asyncio.AbstractEventLoop
        self._chan: asyncio.Queue[Tuple] | None = None
        self._workers: list[asyncio.Task[None]] = []
        # One worker fills a batch at a time, so batches leave in queue order.
        self._collect_lock: contextlib.AbstractAsyncContextManager[Any] = (
            asyncio.Lock() if config.batch_size > 1 else contextlib.nullcontext()
        )
        self._idle: set[asyncio.Task[Any]] = set()
        self._woken: set[asyncio.Task[Any]] = set()
        self._in_flight = self._waiting = 0  # requests; events that failed, not yet settled
        self._pending: set[_Request] = set()  # waiting for a retry: timer, line or due
        self._line: deque[_Request] = deque()  # waiting for room in the retry window
        self._due: deque[_Request] = deque()  # retries whose time came, for the next worker
        self._window = config.max_in_flight
        self._cycle = 0  # requests in the retry window
        self._failing_since: float | None = None
        self._warned = 0.0
        self._failing_share = 0.0  # of recent attempts to the target: see _next_wait
        self._draining = self._sealed = False  # sealed: too late for run() to start
        self._deadline: float | None = None
        self._deadline_set = asyncio.Event()
        self._closing: asyncio.Future[None] | None = None
        # Events failed by the shutdown: said in one line once all are settled, not one
        # line per request (a stop while the target is down fails hundreds at once).
        self._shut_out: list[str] = []
        self._shut_why = ""

    async def run(self, chan: asyncio.Queue[Tuple]) -> None:
        """Deliver tuples from ``chan`` until :meth:`drain` or :meth:`stop` has settled them."""
        if self._chan is not None:
            raise RuntimeError("Deliverer.run() may be called only once")
        self._chan = chan
        if self._sealed:  # stopped before run() began: nothing sent, nothing dropped silently
            await self._fail_rest()
            return
        self._loop = asyncio.get_running_loop()
        # Gauges are read when scraped, which costs nothing per request.
        self.metrics.queue_depth.set_function(chan.qsize)
        self.metrics.delivery_in_flight.set_function(lambda: self._in_flight)
        self.metrics.delivery_waiting.set_function(lambda: self._waiting)
        self.metrics.retry_window.set_function(lambda: self._window)
        self._workers = [
            asyncio.create_task(self._worker(chan), name=f"cdk-delivery-{i}")
            for i in range(self.config.max_in_flight)
        ]
        for result in await asyncio.gather(*self._workers, return_exceptions=True):
            if isinstance(result, Exception):  # a bug: the other workers went on
                self.log.error("delivery worker crashed", exc_info=result)

    async def drain(self) -> None:
        """Once nothing more goes into ``chan``: settle every queued, waiting and in-flight
        event with no deadline (delivered, or failed once its attempts run out: with
        ``send_event_attempts <= 0``, only delivered), then close the connection pools."""
        await self._finish(None)

    async def stop(self, grace: float) -> None:
        """:meth:`drain` within ``grace`` seconds: a retry due later, and what is left then,
        fail with :class:`ShutdownError`. During a ``drain()`` or ``stop()`` it brings the
        deadline forward to its own, if earlier; every call returns once all is settled."""
        await self._finish(max(0.0, grace))

    async def _finish(self, grace: float | None) -> None:
        loop = asyncio.get_running_loop()
        if grace is not None and (self._deadline is None or loop.time() + grace < self._deadline):
            self._deadline = loop.time() + grace
            self._deadline_set.set()
            await self._fail_rest(late_only=True)
        if self._closing is None:
            self._draining = True
            self._wake_idle()
            self._closing = asyncio.ensure_future(self._close())
        if self._deadline is not None:
            await asyncio.wait({self._closing}, timeout=max(0.0, self._deadline - loop.time()))
            for task in self._workers:
                task.cancel()  # the deadline passed: what is still in flight fails
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._chan is None:
            await asyncio.sleep(0)  # run() may be scheduled but not started yet
        self._sealed = True
        if self._workers:
            await asyncio.wait(self._workers)
        await self._fail_rest()
        for client in (self._client, self._dead_client):
            if client is not None:
                await client.close()

    def _new_client(self, url: str, token: SecretStr | None) -> Client:
        # One connection per worker: a worker never has more than one request out.
        bearer = None if token is None else f"Bearer {token.get_secret_value()}"
        return Client(
            url,
            limit=self.config.max_in_flight,
            timeout=self.config.attempt_timeout,
            max_body=4 * ERROR_DATA_BYTES,
            ssl=self._tls,
            authorization=bearer,
        )

    async def _fail_rest(self, late_only: bool = False) -> None:
        """Fail what waits for a retry and is left in ``chan`` (only retries due too late)."""
        deadline = self._deadline or 0.0
        doomed = [r for r in self._pending if not late_only or r.retry_at >= deadline]
        for req in doomed:
            self._pending.discard(req)
            if req.timer is not None:
                req.timer.cancel()
        self._line = deque(r for r in self._line if r in self._pending)
        self._due = deque(r for r in self._due if r in self._pending)
        left: list[Tuple] = []
        while self._chan is not None and not late_only and not self._chan.empty():
            left.append(self._chan.get_nowait())
        for req in doomed:
            await self._settle(req, self._stopped(req))
        if left:
            error = ShutdownError("shut down before it was sent")
            await self._settle(_Request(left, self._client), error)
        if not late_only and self._shut_out:
            ids, self._shut_out = self._shut_out, []
            last = f" ... {ids[-1]}" if len(ids) > 1 else ""
            text = "shut down with %d event(s) not delivered [%s%s]: %s"
            self.log.warning(text, len(ids), ids[0], last, self._shut_why)

    def _stopped(self, req: _Request, text: str = "shut down before a retry") -> DeliveryError:
        if req.original is None:
            return ShutdownError(text, req.error)
        req.original.args = (f"{req.original} (shut down before the dead-letter target took it)",)
        return req.original

    async def _worker(self, chan: asyncio.Queue[Tuple]) -> None:
        owned: list[_Request] = []  # what this worker settles if it is cancelled
        while True:
            try:
                if self._due:
                    owned = [self._due.popleft()]
                    self._pending.discard(owned[0])
                else:
                    async with self._collect_lock:
                        tuples = await self._take(chan)
                    if tuples is None:
                        return
                    owned = self._encode(tuples, self._client, {}) if tuples else []
                while owned:
                    if owned[0].data:
                        await self._send(owned[0])
                    else:
                        await self._settle(owned[0], owned[0].error)  # it cannot be encoded
                    del owned[0]
                if self._draining and not self._pending:
                    self._wake_idle()  # nothing left to wait for: idle workers may end
            except asyncio.CancelledError:
                # stop() reached its deadline (or run() was cancelled) mid-request.
                for req in owned:
                    error = self._stopped(req, "shut down while it was being delivered")
                    await self._settle(req, None if req.delivered else error)
                raise
            except Exception as exc:  # a bug must not lose tuples or stop the worker
                self.log.exception("delivery of %d request(s) failed unexpectedly", len(owned))
                for req in owned:
                    await self._settle(req, None if req.delivered else DeliveryError(one_line(exc)))
                owned = []

    async def _take(self, chan: asyncio.Queue[Tuple]) -> list[Tuple] | None:
        """The next tuples of ``chan``: ``[]`` when a retry is due first, ``None`` at the end."""
        while True:
            if self._due:
                return []
            if self._waiting >= self.config.queue_size:
                # A plain asyncio.Queue does not count waiting events: take no more for now.
                await self._idle_wait(self._loop.create_future())
                continue
            try:
                first = chan.get_nowait()
            except asyncio.QueueEmpty:
                if self._draining and not self._pending:
                    return None
                first = await self._idle_wait(chan.get())
                if first is None:
                    continue
            return [first] if self._batch_size == 1 else await self._fill([first], chan)

    async def _fill(self, tuples: list[Tuple], chan: asyncio.Queue[Tuple]) -> list[Tuple]:
        until = self._loop.time() + self.config.batch_linger
        try:
            while len(tuples) < self._batch_size:
                if not chan.empty():
                    if isinstance(chan, DeliveryQueue):
                        tuples += chan.take(self._batch_size - len(tuples))
                    else:
                        tuples.append(chan.get_nowait())
                    continue
                remaining = until - self._loop.time()
                if self._draining or remaining <= 0:
                    break
                item = await self._idle_wait(chan.get(), remaining)
                if item is None:
                    break
                tuples.append(item)
        except asyncio.CancelledError:
            error = ShutdownError("shut down while a batch was being collected")
            await self._settle(_Request(tuples, self._client), error)
            raise
        return tuples

    async def _idle_wait(self, waiting: Awaitable[Any], timeout: float | None = None) -> Any:
        """Await ``waiting`` as an idle worker: ``None`` on timeout, or when woken."""
        task = asyncio.current_task()
        assert task is not None
        self._idle.add(task)
        try:
            async with asyncio.timeout(timeout):
                return await waiting
        except TimeoutError:
            return None
        except asyncio.CancelledError:
            if task not in self._woken:
                raise
            self._woken.discard(task)
            if task.uncancel() > 0:  # cancelled by someone else as well
                raise
            return None
        finally:
            self._idle.discard(task)

    def _wake_idle(self, one: bool = False) -> None:
        # Idle workers hold nothing: they look again for due retries, room or the end.
        for task in list(self._idle):
            self._idle.discard(task)
            self._woken.add(task)
            task.cancel()
            if one:
                return

    def _encode(self, tuples: list[Tuple], client: Client, extra: dict[str, str]) -> list[_Request]:
        """The requests of ``tuples``, most often one: one without data holding the EncodeError
        of each tuple that cannot be encoded, then one per specversion run (a batch has one)."""
        extensions = {**(self.overrides or {}), **extra} if extra else self.overrides
        # A user's event may break the encoder in any way; the slow path finds which did.
        with contextlib.suppress(Exception):
            events = [_outbound(item, extensions) for item in tuples]
            return [self._request(tuples, client, events)]
        failed: list[_Request] = []
        runs: list[tuple[Any, list[Tuple], list[CloudEvent]]] = []
        for item in tuples:
            try:
                event = _outbound(item, extensions)
                self._wire([event], client, {})
            except Exception as exc:  # see above
                error = EncodeError(f"event cannot be encoded: {_describe(exc)}")
                failed.append(_Request([item], client, error=error))
                continue
            version = event.get_attributes().get("specversion")
            if not runs or runs[-1][0] != version:
                runs.append((version, [], []))
            runs[-1][1].append(item)
            runs[-1][2].append(event)
        return failed + [self._request(t, client, e) for _, t, e in runs]

    def _request(self, tuples: list[Tuple], client: Client, events: list[CloudEvent]) -> _Request:
        if not tracing.active:
            return _Request(tuples, client, self._wire(events, client, {}))
        span, events, headers = tracing.start_send(events, client.url)
        try:
            return _Request(tuples, client, self._wire(events, client, headers), span=span)
        except Exception as exc:
            tracing.end_send(span, error=exc)
            raise

    def _wire(self, events: list[CloudEvent], client: Client, extra: dict[str, str]) -> bytes:
        # The client refuses headers it cannot write (a line break or a non-Latin-1
        # character in a binary-mode Content-Type): that is the event's fault, found here.
        headers, body = self._encode_one(events[0]) if self._batch_size == 1 else to_batch(events)
        return client.encode_request(body, {**headers, **extra} if extra else headers)

    async def _send(self, req: _Request) -> None:
        """Send ``req`` until it is settled or, with more than one in flight, waits a retry."""
        loop, attempts = self._loop, self.config.send_event_attempts
        error: BaseException | None
        while True:
            if not req.attempt:
                req.started = loop.time()
            req.attempt += 1
            self._in_flight += 1
            try:
                response = await req.client.send(req.data, self._check(req))
                req.status = response.status
                error = None if 200 <= response.status < 300 else self._answer_error(response)
            except (ClientError, OSError, TimeoutError) as exc:
                error = exc
            except Fenced as exc:
                if await self._split(req, exc):
                    req.attempt -= 1  # nothing was written
                    continue  # with the events it may still send
                await self._settle(req, exc)
                return
            finally:
                self._in_flight -= 1
            if req.original is None:  # a dead-letter target's answers tell nothing of the target
                failed = error is not None and not isinstance(error, TargetRejected)
                self._failing_share += (failed - self._failing_share) / _SHARE_SPAN
            if error is None:
                await self._succeed(req)
                return
            req.error = error
            if isinstance(error, TargetRejected) or 0 < attempts <= req.attempt:
                if not isinstance(error, TargetRejected):
                    self._failing(req, error)
                    error = AttemptsExhausted(req.attempt, error)
                if await self._give_up(req, error):
                    continue  # on to the dead-letter target
                return
            req.backoff, wait = self._next_wait(req, error)
            when = loop.time() + wait
            if self._deadline is None or when < self._deadline:
                self.metrics.retries.inc()
                if self.log.isEnabledFor(logging.DEBUG):
                    why = self._redact(_describe(error))
                    text = "retrying %d event(s) in %.3fs after attempt %d: %s"
                    self.log.debug(text, len(req.tuples), wait, req.attempt, why)
                if not req.retry_at:  # from now on its events count as waiting
                    self._count_waiting(len(req.tuples))
                req.retry_at = when
                self._failing(req, error)
                if self.config.max_in_flight > 1:
                    self._park(req)
                    return
                await self._pause(when)
            if self._deadline is not None and when >= self._deadline:
                await self._settle(req, self._stopped(req))
                return

    async def _split(self, req: _Request, error: Fenced) -> bool:
        """A batch the gate refused: fail only its events the gate refuses one by one (a
        partition this replica no longer leads) and keep ``req`` for the rest, re-encoded.
        False when that leaves nothing to send (or it is on its way to the dead-letter target)."""
        gate, rest = self.gate, req.tuples[req.settled :]
        if gate is None or len(rest) < 2 or req.original is not None:
            return False
        keep = [item for item in rest if gate([item]) is None]
        if not keep or len(keep) == len(rest):
            return False
        (again, *more) = self._encode(keep, req.client, {})
        if more or not again.data:
            return False
        if again.span is not None:
            tracing.end_send(again.span)
        drop = [item for item in rest if all(item is not kept for kept in keep)]
        if req.retry_at:
            self._count_waiting(-len(drop))  # counted as waiting with req: not any more
        await self._settle(_Request(drop, req.client), error)
        req.tuples, req.settled, req.data = keep, 0, again.data
        return True

    def _check(self, req: _Request) -> Callable[[], None] | None:
        """What the client calls right before writing ``req``: the gate, raising :class:`Fenced`."""
        gate = self.gate
        if gate is None:
            return None

        def check() -> None:
            reason = gate(req.tuples)
            if reason is not None:
                raise Fenced(f"not sent: {reason}")

        return check

    def _answer_error(self, response: ClientResponse) -> DeliveryError:
        data, escape = response.body, "surrogateescape"
        if data:  # masked before it is cut: a target echoing the token must not leak a part
            data = self._redact(data.decode("utf-8", escape)).encode("utf-8", escape)
        excerpt = " ".join(data[: EXCERPT_CHARS * 4].decode("utf-8", "replace").split())
        if len(excerpt) > EXCERPT_CHARS:
            excerpt = excerpt[: EXCERPT_CHARS - 3] + "..."
        status, start = response.status, data[:ERROR_DATA_BYTES]
        if status < 500 and status not in (404, 408, 409, 429):  # as Knative's senders retry
            return TargetRejected(status, excerpt, start)
        header = response.headers.get("retry-after") if status in (429, 503) else None
        return TargetUnavailable(status, excerpt, start, retry_after_seconds(header))

    async def _succeed(self, req: _Request) -> None:
        self.metrics.delivery_latency.observe(self._loop.time() - req.started)
        if req.original is not None:
            self.metrics.dead_lettered.inc(len(req.tuples))
            await self._settle(req, DeadLettered(self._dead_shown, req.original))
            return
        self.metrics.delivered.inc(len(req.tuples))
        req.delivered = True
        if self._window < self.config.queue_size:
            self._window += 1
            self._admit()
        await self._settle(req)
        if self._failing_since is not None and not self._waiting:
            seconds, self._failing_since = self._loop.time() - self._failing_since, None
            self.log.info("deliveries to %s succeed again, after %.1f s", self._shown, seconds)

    async def _give_up(self, req: _Request, error: DeliveryError) -> bool:
        """Fail ``req`` for good; True when it goes on to the dead-letter target instead."""
        self.metrics.delivery_latency.observe(self._loop.time() - req.started)
        dead = self._dead_client
        if req.original is not None:
            note = f"the dead-letter target {self._dead_shown} failed too: {_describe(error)}"
            error, error.args = req.original, (f"{req.original} ({note})",)
        elif dead is not None:
            answer = error.last_error if isinstance(error, AttemptsExhausted) else error
            if isinstance(answer, _Answered):
                extensions = error_extensions(self._shown, answer.status, answer.body)
            else:
                extensions = error_extensions(self._shown)
            (lettered, *rest) = self._encode(req.tuples, dead, extensions)
            if lettered.data and not rest:
                if req.span is not None:
                    tracing.end_send(req.span, req.status, error)
                req.data, req.client, req.original, req.attempt = lettered.data, dead, error, 0
                req.backoff, req.span = 0.0, lettered.span
                return True
        await self._settle(req, error)
        return False

    def _failing(self, req: _Request, error: BaseException) -> None:
        """An attempt failed that is worth retrying: narrow the window, and say so once."""
        if req.original is not None:
            return  # the dead-letter target's troubles say nothing of the target's
        self._window = max(self.config.max_in_flight, self._window - 1)
        now = self._loop.time()
        if self._failing_since is None:
            self._failing_since, state = now, "are failing"
        elif now - self._warned >= self.reminder:
            state = f"still fail, for {now - self._failing_since:.0f} s"
        else:
            return
        self._warned = now
        why, queued = self._redact(_describe(error)), self._chan.qsize() if self._chan else 0
        text = "deliveries to %s %s (%s); %d event(s) wait for a retry, %d queued"
        self.log.warning(text, self._shown, state, why, self._waiting, queued)

    def _park(self, req: _Request) -> None:
        """Let ``req`` wait for its retry without a worker, in the retry window if it has room.

        At most ``_window`` requests wait for or make a retry; the others wait their turn.
        It widens by one with each success and narrows by one with each retried failure,
        between ``max_in_flight`` and ``queue_size``: a failing target sees no more
        retries than ``max_in_flight`` workers each holding one event would send it.
        """
        self._pending.add(req)
        if req.cycling and self._cycle > self._window:
            req.cycling = False  # the window shrank: this one waits for a turn again
            self._cycle -= 1
        if req.cycling:
            req.timer = self._loop.call_at(req.retry_at, self._on_due, req)
        else:
            self._line.append(req)
            self._admit()

    def _admit(self) -> None:
        while self._line and self._cycle < self._window:
            req = self._line.popleft()
            req.cycling = True
            self._cycle += 1
            req.timer = self._loop.call_at(req.retry_at, self._on_due, req)

    def _on_due(self, req: _Request) -> None:
        req.timer = None
        self._due.append(req)
        self._wake_idle(one=True)

    def _count_waiting(self, count: int) -> None:
        self._waiting += count
        if isinstance(self._chan, DeliveryQueue):
            self._chan.hold(count)
        if count < 0 and self._waiting < self.config.queue_size <= self._waiting - count:
            self._wake_idle()  # workers holding back for room may take events again

    async def _pause(self, until: float) -> None:  # cut short by a deadline before then
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(until):
                await self._deadline_set.wait()
        if self._deadline is None or until < self._deadline:
            await asyncio.sleep(max(0.0, until - self._loop.time()))

    def _next_wait(self, req: _Request, error: BaseException) -> tuple[float, float]:
        """(new backoff state, seconds to wait): decorrelated jitter, ``Retry-After`` a floor.

        The jitter starts from ``retry_backoff`` times the square of the share of recent
        attempts to the target that failed: failures scattered among successes (a quarter
        failing: a sixteenth of it) retry soon, since the room their events hold in
        ``queue_size`` caps the rate (Little's law); a target whose every answer fails gets
        the whole of it, and each request's own wait still grows with its failures.
        """
        share = self._failing_share if req.original is None else 1.0
        base, cap = self.config.retry_backoff * share * share, self.config.retry_backoff_max
        previous = req.backoff or base
        backoff = max(_MIN_BACKOFF, min(cap, random.uniform(base, max(base, previous * 3))))
        if isinstance(error, TargetUnavailable) and error.retry_after is not None:
            return backoff, max(backoff, min(error.retry_after, self.config.retry_after_max))
        return backoff, backoff

    async def _settle(self, req: _Request, error: BaseException | None = None) -> None:
        """Call back each tuple of ``req`` not called back yet: ``success()`` or ``failed``."""
        tuples = req.tuples
        if not req.done:
            req.done = True
            if req.span is not None:
                tracing.end_send(req.span, req.status, error)
            if req.retry_at:
                self._count_waiting(-len(tuples))
            if req.cycling:
                req.cycling = False
                self._cycle -= 1
                self._admit()
            rest = tuples[req.settled :]
            if isinstance(error, Fenced):
                self.metrics.failed.labels(_reason(error)).inc(len(rest))
                if self.log.isEnabledFor(logging.DEBUG):  # the service says it once, not per event
                    self.log.debug("%d event(s) %s", len(rest), error)
            elif isinstance(error, AttemptsExhausted) and all(map(self.holds, rest)):
                self.log.debug("%d held event(s) out of attempts: sent again", len(rest))
            elif error is not None:
                ids = [_event_id(t) for t in rest]
                why = self._redact(_describe(error))
                if isinstance(error, ShutdownError):
                    self._shut_out += ids  # said once everything is settled (_fail_rest)
                    self._shut_why = self._shut_why or why
                else:
                    more = f" and {len(ids) - 20} more" if ids[20:] else ""
                    text = "delivery failed for %d event(s) [%s]: %s"
                    self.log.warning(text, len(ids), ", ".join(ids[:20]) + more, why)
                self.metrics.failed.labels(_reason(error)).inc(len(ids))
        chan = self._chan
        # Read once per request, not per event: any later rise means this worker was
        # cancelled, whichever callback it shows up in.
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        while req.settled < len(tuples):
            item = tuples[req.settled]
            req.settled += 1
            if chan is not None:
                chan.task_done()
            # Most callbacks are plain functions: no coroutine per event for them.
            pending = self._call(item, error, task, cancelling)
            if pending is not None:
                await pending

    def _call(
        self, item: Tuple, error: BaseException | None, task: Any, cancelling: int
    ) -> Awaitable[None] | None:
        """Run the ``success`` or ``failed`` callback of ``item``; what it raises is logged
        (``task`` is the calling worker, ``cancelling`` its count of cancellations before).
        What an ``async`` callback returned comes back, to be awaited."""
        kind, args = ("success", ()) if error is None else ("failed", (error,))
        try:
            callback = getattr(item, kind, None)
            result = None if callback is None else callback(*args)
            if result is not None and inspect.isawaitable(result):
                return self._await_call(result, item, kind, task, cancelling)
        except (Exception, asyncio.CancelledError) as exc:
            self._raised(exc, item, kind, task, cancelling)
        return None

    async def _await_call(
        self, result: Awaitable[Any], item: Tuple, kind: str, task: Any, cancelling: int
    ) -> None:
        try:
            await result
        except (Exception, asyncio.CancelledError) as exc:
            self._raised(exc, item, kind, task, cancelling)

    def _raised(
        self, exc: BaseException, item: Tuple, kind: str, task: Any, cancelling: int
    ) -> None:
        """Log what a callback raised (called while handling it), or re-raise a cancellation."""
        # Only a cancellation of this worker goes on; a CancelledError of the
        # callback's own making is its failure, and must not end the worker.
        cancelled = isinstance(exc, asyncio.CancelledError)
        if cancelled and (task is None or task.cancelling() > cancelling):
            raise exc
        self.log.exception("%s callback of event %s raised", kind, _event_id(item))


def _outbound(item: Tuple, extensions: Mapping[str, Any] | None) -> CloudEvent:
    if not isinstance(item, Tuple):  # a plain event put into chan by mistake
        raise TypeError(f"chan holds a {type(item).__name__}, not a cdk.Tuple")
    return with_extensions(item.event, extensions) if extensions else item.event


def _event_id(item: Tuple) -> str:
    with contextlib.suppress(Exception):
        return str(item.event.get_id())
    return "?"
