"""CaptureTarget: a real HTTP receiver on loopback that records what a source delivers.

It decodes every request with :func:`cdk.codec.from_http` (so a malformed request is
answered 400 or 415, like a strict receiver) and keeps each request's mode, headers,
events, order and arrival time. A script of behaviours makes the next requests fail:
answer a status (with ``Retry-After``), drop the connection unanswered, or answer late;
:meth:`CaptureTarget.flaky` fails a seeded random share of them. It serves https:// when
given an ``ssl.SSLContext``.

It runs on ``aiohttp.web``, independent of the kit's own HTTP server, so a bug there
cannot hide a bug in delivery. Use it from async code (``async with CaptureTarget()``)
or from plain synchronous tests (``with CaptureTarget.in_thread() as target``).
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Self

from aiohttp import web
from cloudevents.core.v1.event import CloudEvent

from cdk.codec import CodecError, from_http

__all__ = ["CaptureTarget", "CapturedRequest", "free_port"]

_ACCEPTED = 200


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for a target started later on purpose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(slots=True)
class CapturedRequest:
    """One request the target saw; ``index`` is its place in the order of answers.

    ``status`` is what the target answered; ``None`` means it closed the connection
    without answering (a dropped request, or a delayed one the sender gave up on).
    ``mode`` and ``events`` are empty when the body did not decode (see ``error``).
    """

    index: int
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    mode: str | None = None
    events: list[CloudEvent] = field(default_factory=list)
    status: int | None = None
    error: str | None = None
    arrived: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(slots=True)
class _Behaviour:
    kind: str  # "answer", "drop" or "delay"
    status: int = _ACCEPTED
    body: bytes = b""
    retry_after: str | None = None
    seconds: float = 0.0


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode("utf-8") if isinstance(body, str) else body


class CaptureTarget:
    """An HTTP receiver on a loopback port that records every event it accepts.

    ``port=0`` picks a free port; pass a port chosen with :func:`free_port` to start
    the target after the sender is already trying to reach it.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> None:
        self.host = host
        self._port = port
        self._tls = tls
        self._random: tuple[random.Random, float, float] | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._script: deque[_Behaviour] = deque()
        self._standing: _Behaviour | None = None
        self._all: list[CapturedRequest] = []
        self._accepted: list[CapturedRequest] = []
        self._events: list[CloudEvent] = []
        self._version = 0  # bumped on every record, so a sync waiter never misses one
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._runner: web.ServerRunner | None = None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.host}:{self._port}/"

    async def start(self) -> None:
        """Listen and serve; returns once the port accepts connections."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        self._port = sock.getsockname()[1]
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self._tls).start()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @classmethod
    @contextmanager
    def in_thread(cls, host: str = "127.0.0.1", port: int = 0) -> Iterator[CaptureTarget]:
        """Run a target on its own event loop in a background thread (for sync tests)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="cdk-capture-target", daemon=True)
        thread.start()
        target = cls(host, port)
        try:
            asyncio.run_coroutine_threadsafe(target.start(), loop).result(timeout=10)
            yield target
        finally:
            try:
                asyncio.run_coroutine_threadsafe(target.close(), loop).result(timeout=10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=10)
                loop.close()

    # -- failure injection -----------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        *,
        retry_after: float | str | None = None,
        body: bytes | str = b"",
    ) -> None:
        """Answer the next ``n`` requests with ``status`` (and ``Retry-After`` if given)."""
        after = None if retry_after is None else _retry_after_text(retry_after)
        self._push(n, _Behaviour("answer", status, _as_bytes(body), after))

    def reject_next(self, n: int = 1, status: int = 400, body: bytes | str = b"rejected") -> None:
        """Answer the next ``n`` requests with a status a sender must not retry."""
        self._push(n, _Behaviour("answer", status, _as_bytes(body)))

    def drop_next(self, n: int = 1) -> None:
        """Close the connection of the next ``n`` requests without answering."""
        self._push(n, _Behaviour("drop"))

    def delay_next(self, n: int, seconds: float, status: int = _ACCEPTED) -> None:
        """Answer the next ``n`` requests only after ``seconds`` (with ``status``)."""
        self._push(n, _Behaviour("delay", status, seconds=seconds))

    def fail_with(
        self,
        status: int | None,
        *,
        retry_after: float | str | None = None,
        body: bytes | str = b"",
    ) -> None:
        """Answer every request with ``status`` once the script is used up; ``None`` ends it."""
        after = None if retry_after is None else _retry_after_text(retry_after)
        with self._lock:
            self._standing = (
                None if status is None else _Behaviour("answer", status, _as_bytes(body), after)
            )

    def flaky(self, fail: float = 0.0, drop: float = 0.0, seed: int = 0) -> None:
        """Once the script is used up, answer a ``fail`` share of requests 503 and drop a
        ``drop`` share unanswered, drawn from a generator seeded with ``seed``."""
        with self._lock:
            self._random = (random.Random(seed), fail, drop) if fail or drop else None

    def _push(self, n: int, behaviour: _Behaviour) -> None:
        with self._lock:
            self._script.extend([behaviour] * n)

    def _next_behaviour(self) -> _Behaviour | None:
        with self._lock:
            if self._script:
                return self._script.popleft()
            if self._random is not None:
                draw = self._random[0].random()
                if draw < self._random[2]:
                    return _Behaviour("drop")
                if draw < self._random[2] + self._random[1]:
                    return _Behaviour("answer", 503)
            return self._standing

    # -- what arrived ----------------------------------------------------------------

    @property
    def requests(self) -> list[CapturedRequest]:
        """The requests answered 2xx, in the order they were answered."""
        with self._lock:
            return list(self._accepted)

    @property
    def all_requests(self) -> list[CapturedRequest]:
        """Every request seen, including failed, dropped and malformed ones."""
        with self._lock:
            return list(self._all)

    @property
    def events(self) -> list[CloudEvent]:
        """The events of every accepted request, flattened, in the order they were accepted."""
        with self._lock:
            return list(self._events)

    @property
    def attempts(self) -> int:
        """How many requests arrived, whatever the answer."""
        with self._lock:
            return len(self._all)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate()`` holds; raise ``TimeoutError`` after ``timeout`` s.

        For synchronous callers only (with :meth:`in_thread`); the predicate runs
        without the target's lock held, so it may read ``events`` and friends.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                seen = self._version
            if predicate():
                return
            with self._cond:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"condition not met within {timeout}s "
                        f"({len(self._events)} event(s) in {len(self._all)} request(s))"
                    )
                if self._version == seen:
                    self._cond.wait(remaining)

    def wait_for_sync(self, count: int, timeout: float = 5.0) -> list[CloudEvent]:
        """Block until at least ``count`` events were accepted; return them."""
        self.wait_until(lambda: len(self._events) >= count, timeout)
        return self.events

    async def wait_until_async(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Await until ``predicate()`` holds; raise ``TimeoutError`` after ``timeout`` s."""
        if asyncio.get_running_loop() is not self._loop or self._changed is None:
            # The target serves on another loop (in_thread): wait without blocking this one.
            await asyncio.to_thread(self.wait_until, predicate, timeout)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            changed = self._changed
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"condition not met within {timeout}s "
                    f"({len(self._events)} event(s) in {len(self._all)} request(s))"
                )
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                continue

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[CloudEvent]:
        """Await until at least ``count`` events were accepted; return them."""
        await self.wait_until_async(lambda: len(self._events) >= count, timeout)
        return self.events

    def _record(self, record: CapturedRequest) -> None:
        with self._cond:
            record.index = len(self._all)
            self._all.append(record)
            self._version += 1
            if record.accepted:
                self._accepted.append(record)
                self._events.extend(record.events)
            self._cond.notify_all()
        if self._changed is not None:
            # Wake async waiters; a fresh Event makes the next wait block again.
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    # -- serving ---------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        record = CapturedRequest(
            -1, request.method, request.path, headers, body, arrived=time.monotonic()
        )
        behaviour = self._next_behaviour()
        if behaviour is not None and behaviour.kind == "drop":
            self._record(record)
            return _drop(request)
        if behaviour is not None and behaviour.kind == "delay":
            await asyncio.sleep(behaviour.seconds)
            transport = request.transport
            if transport is None or transport.is_closing():
                self._record(record)  # the sender gave up waiting: nothing was answered
                return _drop(request)
        if behaviour is not None and behaviour.kind == "answer":
            record.status = behaviour.status
            self._record(record)
            extra = {"Retry-After": behaviour.retry_after} if behaviour.retry_after else None
            return web.Response(status=behaviour.status, body=behaviour.body, headers=extra)
        return self._accept(request, record, behaviour)

    def _accept(
        self, request: web.BaseRequest, record: CapturedRequest, behaviour: _Behaviour | None
    ) -> web.Response:
        if request.method != "POST":
            record.status = 405
            self._record(record)
            return web.Response(status=405, text="only POST is accepted", headers={"Allow": "POST"})
        try:
            record.mode, record.events = from_http(record.headers, record.body)
        except CodecError as exc:
            record.status = getattr(exc, "status", 400)
            record.error = str(exc)
            self._record(record)
            return web.Response(status=record.status, text=str(exc))
        record.status = behaviour.status if behaviour is not None else _ACCEPTED
        self._record(record)
        return web.Response(status=record.status)


def _drop(request: web.BaseRequest) -> web.StreamResponse:
    transport = request.transport
    if transport is not None:
        transport.abort()
    # The answer below is never written: the connection is gone.
    return web.Response(status=500)


def _retry_after_text(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)
