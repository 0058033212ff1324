"""SinkClient: send CloudEvents (or anything else) to a sink over real HTTP and read the answer.

The synchronous :class:`SinkClient` uses only ``http.client``, so plain pytest functions
can call a running sink without an event loop. :class:`AsyncSinkClient` does the same
with aiohttp for tests that already run inside one. Both encode events with
``cdk.codec``, the same code the runtime sends with, and both can send raw bodies and
headers to probe how a sink treats bad input.
"""

from __future__ import annotations

import http.client
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import orjson
from cloudevents.core.v1.event import CloudEvent

from cdk.codec import encode

__all__ = ["AsyncSinkClient", "Reply", "SinkClient", "encode_events"]

Mode = Literal["binary", "structured", "batch"]


@dataclass(frozen=True, slots=True)
class Reply:
    """A sink's answer: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def ok(self) -> bool:
        """True for a 2xx answer."""
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return orjson.loads(self.body)


def encode_events(events: Sequence[CloudEvent], mode: Mode) -> tuple[dict[str, str], bytes]:
    """Headers and body of one request carrying ``events`` in ``mode``.

    Binary and structured mode carry exactly one event; batch mode any number.
    """
    if mode != "batch" and len(events) != 1:
        raise ValueError(f"{mode} mode carries exactly one event, got {len(events)}")
    return encode(list(events), mode)


def _target(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, base path) of a sink URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def _with_token(headers: Mapping[str, str] | None, token: str | None) -> dict[str, str]:
    merged = dict(headers or {})
    if token is not None and not any(name.lower() == "authorization" for name in merged):
        merged["Authorization"] = f"Bearer {token}"
    return merged


class SinkClient:
    """Synchronous client for one sink URL (``http://127.0.0.1:PORT``).

    Every call opens its own connection, so a sink that closes connections (or a test
    that stops the sink between calls) never leaves the client in a stale state.
    ``token`` adds ``Authorization: Bearer <token>`` to every request that has none.
    """

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout
        self._scheme, self._host, self._port, self._base = _target(url)

    def __enter__(self) -> SinkClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def send(self, *events: CloudEvent, mode: Mode = "binary") -> Reply:
        """POST ``events`` in ``mode``: one event for binary/structured, any number for batch."""
        headers, body = encode_events(events, mode)
        return self.post(body, headers)

    def send_binary(self, event: CloudEvent) -> Reply:
        return self.send(event, mode="binary")

    def send_structured(self, event: CloudEvent) -> Reply:
        return self.send(event, mode="structured")

    def send_batch(self, events: Sequence[CloudEvent]) -> Reply:
        return self.send(*events, mode="batch")

    def post(
        self, body: bytes | str = b"", headers: Mapping[str, str] | None = None, path: str = "/"
    ) -> Reply:
        """POST a raw body with raw headers, for input no encoder would produce."""
        return self.request("POST", path, body, headers)

    def post_json(self, value: Any, path: str = "/") -> Reply:
        """POST ``value`` as ``application/json`` (what a webhook caller sends)."""
        return self.post(orjson.dumps(value), {"Content-Type": "application/json"}, path)

    def get(self, path: str = "/", headers: Mapping[str, str] | None = None) -> Reply:
        return self.request("GET", path, b"", headers)

    def request(
        self,
        method: str,
        path: str = "/",
        body: bytes | str = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send one request and return the whole answer."""
        payload = body.encode("utf-8") if isinstance(body, str) else body
        connection_class = (
            http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        )
        connection = connection_class(self._host, self._port, timeout=self.timeout)
        try:
            # http.client adds Content-Length for a bytes body, even an empty one on POST.
            connection.request(
                method, self._base + path, body=payload, headers=_with_token(headers, self.token)
            )
            response = connection.getresponse()
            data = response.read()
            answer_headers = {name.lower(): value for name, value in response.getheaders()}
            return Reply(response.status, answer_headers, data)
        finally:
            connection.close()


class AsyncSinkClient:
    """The asynchronous twin of :class:`SinkClient`, on one aiohttp session.

    Use it as ``async with AsyncSinkClient(url) as client:``.
    """

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 10.0) -> None:
        _target(url)
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncSinkClient:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout), auto_decompress=False
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, *events: CloudEvent, mode: Mode = "binary") -> Reply:
        headers, body = encode_events(events, mode)
        return await self.post(body, headers)

    async def post(
        self, body: bytes | str = b"", headers: Mapping[str, str] | None = None, path: str = "/"
    ) -> Reply:
        return await self.request("POST", path, body, headers)

    async def post_json(self, value: Any, path: str = "/") -> Reply:
        return await self.post(orjson.dumps(value), {"Content-Type": "application/json"}, path)

    async def get(self, path: str = "/", headers: Mapping[str, str] | None = None) -> Reply:
        return await self.request("GET", path, b"", headers)

    async def request(
        self,
        method: str,
        path: str = "/",
        body: bytes | str = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        if self._session is None:
            raise RuntimeError("use AsyncSinkClient as 'async with AsyncSinkClient(url) as c:'")
        payload = body.encode("utf-8") if isinstance(body, str) else body
        async with self._session.request(
            method,
            self.url + path,
            data=payload,
            headers=_with_token(headers, self.token),
            skip_auto_headers=("Content-Type",),
        ) as response:
            data = await response.read()
            answer_headers = {name.lower(): value for name, value in response.headers.items()}
            return Reply(response.status, answer_headers, data)
