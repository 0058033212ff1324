"""Delivery: drains ``Source.chan`` and POSTs every event to the source's ``target``.

A :class:`Deliverer` runs ``max_in_flight`` workers over one keep-alive connection
pool (:class:`cdk.client.Client`). Each worker takes one event (or up to ``batch_size``
events, waiting at most ``batch_linger`` for a partial batch to fill), encodes the
request once, and sends it until the target answers 2xx, answers a status that is not
worth retrying, the attempts run out, or shutdown ends. Every
:class:`~cdk.connector.Tuple` gets exactly one callback: ``success()`` or
``failed(error)`` with one of the errors defined here.

Retried: transport errors, timeouts, 404, 408, 409, 429 and 5xx (``Retry-After`` is
honoured on 429 and 503). Never retried: any other status, notably 400, 401, 403, 413
and 415. Backpressure comes from ``chan`` being bounded: at most
``max_in_flight * batch_size`` tuples are ever out of it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import re
from collections.abc import Mapping, Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime
from time import time as wall_clock
from typing import Any

import orjson
from cloudevents.core.v1.event import CloudEvent

from cdk.client import Client, ClientError
from cdk.codec import to_batch, to_binary, to_structured, with_extensions
from cdk.config import DeliveryConfig
from cdk.connector import Tuple
from cdk.metrics import Metrics

__all__ = [
    "AttemptsExhausted",
    "Deliverer",
    "DeliveryError",
    "EncodeError",
    "OverridesError",
    "ShutdownError",
    "TargetRejected",
    "TargetUnavailable",
    "parse_ce_overrides",
    "retry_after_seconds",
]

#: Statuses retried besides every 5xx (Knative's sender conventions).
RETRYABLE_4XX = frozenset({404, 408, 409, 429})
#: Statuses whose ``Retry-After`` header is honoured.
RETRY_AFTER_STATUSES = frozenset({429, 503})
#: Longest answer-body excerpt carried by an error.
EXCERPT_CHARS = 200
#: Most bytes of an answer body kept (the rest is read and dropped).
_READ_LIMIT = 64 * 1024
#: Shortest wait between two attempts, whatever the config says: a ``retry_backoff`` of 0
#: would otherwise stay 0 and spin on a target that refuses connections.
_MIN_BACKOFF = 0.01

_PROBE = CloudEvent({"id": "probe", "source": "/", "type": "probe", "specversion": "1.0"})
_WHITESPACE = re.compile(r"\s+")

_log = logging.getLogger("cdk.delivery")


class DeliveryError(Exception):
    """An event was not delivered; ``str()`` says why in words a user can act on."""


class TargetRejected(DeliveryError):
    """The target answered a status that is never retried (400, 401, 403, 413, 415, ...)."""

    def __init__(self, status: int, excerpt: str = "") -> None:
        self.status = status
        self.excerpt = excerpt
        text = f"target rejected the request with HTTP {status}"
        super().__init__(f"{text}: {excerpt}" if excerpt else text)


class TargetUnavailable(DeliveryError):
    """The target answered a status worth retrying (404, 408, 409, 429, 5xx)."""

    def __init__(self, status: int, excerpt: str = "", retry_after: float | None = None) -> None:
        self.status = status
        self.excerpt = excerpt
        self.retry_after = retry_after
        text = f"target answered HTTP {status}"
        super().__init__(f"{text}: {excerpt}" if excerpt else text)


class AttemptsExhausted(DeliveryError):
    """Every one of ``send_event_attempts`` attempts failed; ``last_error`` is the last cause."""

    def __init__(self, attempts: int, last_error: BaseException) -> None:
        self.attempts = attempts
        self.last_error = last_error
        super().__init__(f"gave up after {attempts} attempt(s): {_describe(last_error)}")


class ShutdownError(DeliveryError):
    """The connector shut down before the event was delivered (within the grace period)."""

    def __init__(self, message: str, last_error: BaseException | None = None) -> None:
        self.last_error = last_error
        if last_error is not None:
            message = f"{message} (last error: {_describe(last_error)})"
        super().__init__(message)


class OverridesError(ValueError):
    """``K_CE_OVERRIDES`` is not ``{"extensions": {...}}`` with valid attribute names."""


class EncodeError(DeliveryError):
    """The event cannot be written on the wire (it is not a valid CloudEvent)."""


def _describe(error: BaseException) -> str:
    text = str(error)
    if isinstance(error, DeliveryError):
        return text
    # Transport errors often have an empty str(); the type name says what happened.
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _excerpt(body: bytes) -> str:
    text = body[: EXCERPT_CHARS * 4].decode("utf-8", errors="replace")
    text = _WHITESPACE.sub(" ", text).strip()
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP-date).

    Returns ``None`` when the header is absent or unreadable; never a negative number.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # The asctime form carries no zone, yet every HTTP-date is GMT (RFC 9110 5.6.7).
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (wall_clock() if now is None else now))


def parse_ce_overrides(text: str | None) -> dict[str, Any]:
    """Read ``K_CE_OVERRIDES`` (``{"extensions": {...}}``) into the extensions to apply.

    An empty or absent value means no overrides. Raises ``ValueError`` naming the
    problem (:class:`OverridesError`, a ``ValueError``) when the value is not that JSON
    shape or names an invalid attribute.
    """
    if text is None or not text.strip():
        return {}
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise OverridesError(f"K_CE_OVERRIDES: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise OverridesError('K_CE_OVERRIDES: must be a JSON object like {"extensions": {...}}')
    # Other keys are ignored: the platform may add fields this kit does not know yet.
    extensions = data.get("extensions")
    if extensions is None:
        return {}
    if not isinstance(extensions, dict):
        raise OverridesError('K_CE_OVERRIDES: "extensions" must be a JSON object')
    try:
        # The codec's own rules decide what an extension may be named and hold.
        with_extensions(_PROBE, extensions)
    except ValueError as exc:
        raise OverridesError(f"K_CE_OVERRIDES: {exc}") from None
    return dict(extensions)


def _retryable(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_4XX


class _Batch:
    """Tuples taken from ``chan`` together.

    ``settled`` counts the leading tuples whose callback ran; the first ``delivered``
    reached the target, so an interrupted batch still reports those as successes.
    """

    __slots__ = ("delivered", "settled", "tuples")

    def __init__(self, tuples: list[Tuple]) -> None:
        self.tuples = tuples
        self.settled = 0
        self.delivered = 0


class Deliverer:
    """Delivers the tuples of a source's ``chan`` to ``config.target``.

    ``await run(chan)`` drains ``chan`` until :meth:`stop` is called; :meth:`stop`
    delivers what is still queued or in flight within the grace period, fails the
    rest with :class:`ShutdownError`, and closes the connection pool.
    """

    def __init__(
        self,
        config: DeliveryConfig,
        metrics: Metrics,
        *,
        overrides: Mapping[str, Any] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.overrides = dict(overrides) if overrides else None
        self.log = logger or _log
        self._attempts = config.send_event_attempts
        self._batch_size = config.batch_size
        self._linger = config.batch_linger
        self._encode_one = to_structured if config.content_mode == "structured" else to_binary
        self._client: Client | None = None
        self._chan: asyncio.Queue[Tuple] | None = None
        self._workers: list[asyncio.Task[None]] = []
        # Only one worker fills a batch at a time, so at most one batch is ever partial
        # and batches leave in queue order.
        self._collect_lock = asyncio.Lock()
        self._idle: set[asyncio.Task[Any]] = set()
        self._woken: set[asyncio.Task[Any]] = set()
        self._draining = asyncio.Event()  # set when stop() begins
        self._deadline: float | None = None
        self._started = asyncio.Event()
        self._stopped: asyncio.Event | None = None
        self._in_flight = 0

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, chan: asyncio.Queue[Tuple]) -> None:
        """Deliver tuples from ``chan`` until :meth:`stop` has drained it."""
        if self._chan is not None:
            raise RuntimeError("Deliverer.run() may be called only once")
        self._chan = chan
        if self._stopped is not None and self._stopped.is_set():
            # stop() finished before run() began: nothing is sent, nothing dropped silently.
            await self._fail_queued()
            return
        self._client = self._new_client()
        # Both gauges are read when scraped, which costs nothing per request.
        self.metrics.queue_depth.set_function(chan.qsize)
        self.metrics.delivery_in_flight.set_function(self._requests_in_flight)
        self._workers = [
            asyncio.create_task(self._worker(chan), name=f"cdk-delivery-{i}")
            for i in range(self.config.max_in_flight)
        ]
        self._started.set()
        try:
            await asyncio.wait(self._workers)
        except asyncio.CancelledError:
            for task in self._workers:
                task.cancel()
            await asyncio.wait(self._workers)
            raise
        finally:
            for task in self._workers:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    self.log.error("delivery worker crashed", exc_info=task.exception())

    async def stop(self, grace: float) -> None:
        """Deliver what is queued and in flight within ``grace`` seconds, then give up.

        Call it once the producer has stopped putting tuples into ``chan``. Tuples not
        delivered by the deadline get ``failed(ShutdownError(...))``. Calling it again
        waits for the first call to finish.
        """
        if self._stopped is not None:
            await self._stopped.wait()
            return
        self._stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        grace = max(0.0, grace)
        deadline = loop.time() + grace
        self._deadline = deadline
        self._draining.set()
        try:
            if self._chan is None:
                # run() may be scheduled but not started yet: let it start and drain.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(grace):
                        await self._started.wait()
            self._wake_idle()
            pending: set[asyncio.Task[None]] = {t for t in self._workers if not t.done()}
            if pending:
                _, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
            await self._fail_queued()
            if self._client is not None:
                await self._client.close()
        finally:
            self._stopped.set()

    async def drain(self) -> None:
        """Settle every queued and in-flight event, with no deadline."""
        await self.stop(1e9)

    def _requests_in_flight(self) -> float:
        return self._in_flight

    def _new_client(self) -> Client:
        # One connection per worker: a worker never has more than one request out.
        token = self.config.target_auth_token
        return Client(
            self.config.target,
            limit=self.config.max_in_flight,
            timeout=self.config.attempt_timeout,
            keepalive=30.0,
            max_body=_READ_LIMIT,
            authorization=None if token is None else f"Bearer {token.get_secret_value()}",
        )

    def _wake_idle(self) -> None:
        # Workers blocked on an empty chan hold nothing: wake them so they drain and exit.
        for task in self._idle:
            self._woken.add(task)
            task.cancel()
        self._idle.clear()

    async def _fail_queued(self) -> None:
        chan = self._chan
        if chan is None:
            return
        left: list[Tuple] = []
        while True:
            try:
                left.append(chan.get_nowait())
            except asyncio.QueueEmpty:
                break
        if left:
            error = ShutdownError("shut down before the event was sent")
            await self._give_up(_Batch(left), error, "shutdown")

    # -- taking tuples out of chan ---------------------------------------------------

    async def _worker(self, chan: asyncio.Queue[Tuple]) -> None:
        single = self._batch_size == 1
        while True:
            if single:
                item = await self._take_one(chan)
                if item is None:
                    return
                batch = _Batch([item])
            else:
                async with self._collect_lock:
                    tuples = await self._take_batch(chan)
                if not tuples:
                    return
                batch = _Batch(tuples)
            try:
                await self._deliver(batch)
            except asyncio.CancelledError:
                # stop() reached its deadline (or run() was cancelled) mid-request.
                error = ShutdownError("shut down while the event was being delivered")
                await self._settle_rest(batch, error, "shutdown")
                raise
            except Exception as exc:  # a bug must not lose tuples or stop the worker
                self.log.exception("delivery of %d event(s) failed unexpectedly", len(batch.tuples))
                await self._settle_rest(batch, DeliveryError(_describe(exc)), "rejected")

    async def _take_one(self, chan: asyncio.Queue[Tuple]) -> Tuple | None:
        while True:
            try:
                return chan.get_nowait()
            except asyncio.QueueEmpty:
                if self._draining.is_set():
                    return None
            item = await self._wait_get(chan, None)
            if item is not None:
                return item

    async def _take_batch(self, chan: asyncio.Queue[Tuple]) -> list[Tuple]:
        size = self._batch_size
        tuples: list[Tuple] = []
        while not tuples:
            try:
                tuples.append(chan.get_nowait())
            except asyncio.QueueEmpty:
                if self._draining.is_set():
                    return tuples
                item = await self._wait_get(chan, None)
                if item is not None:
                    tuples.append(item)
        loop = asyncio.get_running_loop()
        linger_until = loop.time() + self._linger
        try:
            while len(tuples) < size:
                try:
                    tuples.append(chan.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = linger_until - loop.time()
                if self._draining.is_set() or remaining <= 0:
                    break
                item = await self._wait_get(chan, remaining)
                if item is None:
                    break
                tuples.append(item)
        except asyncio.CancelledError:
            error = ShutdownError("shut down while a batch was being collected")
            await self._give_up(_Batch(tuples), error, "shutdown")
            raise
        return tuples

    async def _wait_get(self, chan: asyncio.Queue[Tuple], wait: float | None) -> Tuple | None:
        """Wait for a tuple; ``None`` on timeout or when stop() wakes this worker."""
        task = asyncio.current_task()
        assert task is not None
        self._idle.add(task)
        try:
            if wait is None:
                return await chan.get()
            async with asyncio.timeout(wait):
                return await chan.get()
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

    # -- sending ---------------------------------------------------------------------

    def _encode(self, batch: _Batch) -> tuple[list[BaseException], list[tuple[int, bytes]]]:
        """Encode ``batch`` once: why each tuple that cannot go fails, and the requests.

        ``batch.tuples`` is reordered to match: the tuples that cannot go first, then the
        tuples of each request in turn, in queue order. Most batches are one request; a
        bad event fails alone, and a change of specversion starts another request (a
        batch carries one specversion; splitting keeps the order a single worker keeps).
        """
        tuples = batch.tuples
        single = self._batch_size == 1
        # A user's event may break the encoder in any way; the slow path below finds
        # which events did, and why.
        with contextlib.suppress(Exception):
            events = [self._outbound(item) for item in tuples]
            encoded = self._encode_one(events[0]) if single else to_batch(events)
            return [], [(len(tuples), self._request(encoded))]
        errors: list[BaseException] = []
        ordered: list[Tuple] = []
        runs: list[list[tuple[Tuple, CloudEvent, bytes]]] = []
        run_version: Any = None
        for item in tuples:
            try:
                event = self._outbound(item)
                request = self._request(self._encode_one(event) if single else to_batch([event]))
            except Exception as exc:  # see above
                errors.append(exc)
                ordered.append(item)
            else:
                version = event.get_attributes().get("specversion")
                if not runs or version != run_version:
                    runs.append([])
                    run_version = version
                runs[-1].append((item, event, request))
        requests: list[tuple[int, bytes]] = []
        for run in runs:
            ordered.extend(item for item, _, _ in run)
            if len(run) == 1:
                requests.append((1, run[0][2]))
            else:
                requests.append((len(run), self._request(to_batch([e for _, e, _ in run]))))
        batch.tuples = ordered
        return errors, requests

    def _outbound(self, item: Tuple) -> CloudEvent:
        """The event of ``item`` as it goes out (with ``K_CE_OVERRIDES`` applied)."""
        if not isinstance(item, Tuple):  # a plain event put into chan by mistake
            raise TypeError(f"chan holds a {type(item).__name__}, not a cdk.Tuple")
        event = item.event
        return with_extensions(event, self.overrides) if self.overrides else event

    def _request(self, encoded: tuple[dict[str, str], bytes]) -> bytes:
        # The client refuses headers it cannot write (a line break or a non-Latin-1
        # character in a binary-mode Content-Type): that is the event's fault, found here.
        assert self._client is not None
        headers, body = encoded
        return self._client.encode_request(body, headers)

    async def _deliver(self, batch: _Batch) -> None:
        errors, requests = self._encode(batch)
        for exc in errors:
            error = EncodeError(f"event cannot be encoded: {_describe(exc)}")
            await self._give_up(batch, error, "rejected", count=1)
        for count, request in requests:
            await self._send(batch, count, request)

    async def _send(self, batch: _Batch, count: int, request: bytes) -> None:
        """Send the next ``count`` tuples of ``batch`` as ``request``, retrying as configured."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempt = 0
        delay = self.config.retry_backoff
        metrics = self.metrics
        while True:
            attempt += 1
            self._in_flight += 1
            try:
                status, answer, retry_after = await self._post(request)
            except (ClientError, OSError, TimeoutError) as exc:
                status, answer, retry_after = 0, b"", None
                error: BaseException = exc
            finally:
                self._in_flight -= 1
            if status:
                if 200 <= status < 300:
                    metrics.delivery_latency.observe(loop.time() - started)
                    metrics.delivered.inc(count)
                    batch.delivered = batch.settled + count
                    await self._succeed(batch, count)
                    return
                if not _retryable(status):
                    metrics.delivery_latency.observe(loop.time() - started)
                    rejected = TargetRejected(status, _excerpt(answer))
                    await self._give_up(batch, rejected, "rejected", count)
                    return
                error = TargetUnavailable(status, _excerpt(answer), retry_after)
            if 0 < self._attempts <= attempt:
                metrics.delivery_latency.observe(loop.time() - started)
                await self._give_up(batch, AttemptsExhausted(attempt, error), "exhausted", count)
                return
            delay, wait = self._next_wait(delay, error)
            retry_at = loop.time() + wait
            if not self._too_late(retry_at):
                metrics.retries.inc()
                if self.log.isEnabledFor(logging.DEBUG):
                    self.log.debug(
                        "retrying %d event(s) in %.3fs after attempt %d: %s",
                        count,
                        wait,
                        attempt,
                        _describe(error),
                    )
                await self._pause(retry_at)
            if self._too_late(retry_at):
                error = ShutdownError("shut down before a retry could succeed", error)
                await self._give_up(batch, error, "shutdown", count)
                return

    def _too_late(self, when: float) -> bool:
        """Whether ``when`` falls after the deadline of a shutdown under way."""
        return self._deadline is not None and when >= self._deadline

    async def _pause(self, until: float) -> None:
        """Wait until ``until``; cut short when stop() begins with a deadline before then.

        A long ``Retry-After`` that began before stop() would otherwise hold shutdown
        for the whole grace period, only to fail its events at the end of it.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(until):
                await self._draining.wait()
        if not self._too_late(until):
            await asyncio.sleep(max(0.0, until - asyncio.get_running_loop().time()))

    def _next_wait(self, previous: float, error: BaseException) -> tuple[float, float]:
        """(new backoff state, seconds to wait) with decorrelated jitter and Retry-After."""
        base = self.config.retry_backoff
        cap = self.config.retry_backoff_max
        backoff = max(_MIN_BACKOFF, min(cap, random.uniform(base, max(base, previous * 3))))
        wait = backoff
        if isinstance(error, TargetUnavailable) and error.retry_after is not None:
            # Retry-After is a floor: never retry sooner than the target asked.
            wait = max(wait, min(error.retry_after, self.config.retry_after_max))
        return backoff, wait

    async def _post(self, request: bytes) -> tuple[int, bytes, float | None]:
        assert self._client is not None
        response = await self._client.send(request)
        status = response.status
        retry_after = None
        if status in RETRY_AFTER_STATUSES:
            retry_after = retry_after_seconds(response.headers.get("retry-after"))
        return status, response.body, retry_after

    # -- callbacks -------------------------------------------------------------------

    async def _succeed(self, batch: _Batch, count: int) -> None:
        """Call ``success()`` for the next ``count`` unsettled tuples."""
        end = min(len(batch.tuples), batch.settled + count)
        chan = self._chan
        while batch.settled < end:
            item = batch.tuples[batch.settled]
            batch.settled += 1
            if chan is not None:
                chan.task_done()
            await self._call(item, "success")

    async def _give_up(
        self, batch: _Batch, error: DeliveryError, reason: str, count: int | None = None
    ) -> None:
        """Call ``failed(error)`` for the next ``count`` unsettled tuples (default: all)."""
        tuples = batch.tuples
        end = len(tuples) if count is None else min(len(tuples), batch.settled + count)
        if batch.settled >= end:
            return
        self._log_failure(tuples[batch.settled : end], error)
        self.metrics.failed.labels(reason).inc(end - batch.settled)
        chan = self._chan
        while batch.settled < end:
            item = tuples[batch.settled]
            batch.settled += 1
            if chan is not None:
                chan.task_done()
            await self._call(item, "failed", error)

    async def _settle_rest(self, batch: _Batch, error: DeliveryError, reason: str) -> None:
        """Finish a batch whose delivery was interrupted, each tuple by what became of it."""
        if batch.delivered > batch.settled:
            await self._succeed(batch, batch.delivered - batch.settled)
        await self._give_up(batch, error, reason)

    async def _call(self, item: Tuple, kind: str, *args: BaseException) -> None:
        """Run the ``success`` or ``failed`` callback of ``item``; what it raises is logged."""
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        try:
            callback = getattr(item, kind, None)
            if callback is None:
                return
            result = callback(*args)
            if result is not None and inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            # Only a cancellation of this worker goes on; a CancelledError of the
            # callback's own making is its failure, and must not end the worker.
            if task is None or task.cancelling() > cancelling:
                raise
            self.log.exception("%s callback of event %s raised", kind, _event_id(item))
        except Exception:
            self.log.exception("%s callback of event %s raised", kind, _event_id(item))

    def _log_failure(self, tuples: Sequence[Tuple], error: DeliveryError) -> None:
        ids = [_event_id(t) for t in tuples]
        shown = ", ".join(ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
        self.log.warning("delivery failed for %d event(s) [%s]: %s", len(ids), shown, error)


def _event_id(item: Tuple) -> str:
    with contextlib.suppress(Exception):
        return str(item.event.get_id())
    return "?"
