"""SinkClient: send CloudEvents (encoded by ``cdk.codec``, as the kit sends them) or raw
bodies and headers to a sink over real HTTP, and read the :class:`Reply`. It uses only
``http.client``, so a plain pytest function needs no event loop to call a running sink.
"""

from __future__ import annotations

import http.client
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
from cloudevents.core.v1.event import CloudEvent

from cdk.codec import Mode, encode

__all__ = ["Reply", "SinkClient"]


@dataclass(frozen=True, slots=True)
class Reply:
    """A sink's answer: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return orjson.loads(self.body)


class SinkClient:
    """Synchronous client for one sink URL; ``token`` adds ``Authorization: Bearer <token>``
    to every request that has none. Each call opens its own connection, so a sink that
    closes connections (or stops between calls) never leaves the client stale."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        self.url = url
        self.token = token
        self.timeout = timeout
        self._parts = parts

    def send(self, *events: CloudEvent, mode: Mode = "binary") -> Reply:
        """POST ``events`` in ``mode``: one event for binary/structured, any number for batch."""
        headers, body = encode(events, mode)
        return self.post(body, headers)

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
        headers = dict(headers or {})
        if self.token is not None and not any(n.lower() == "authorization" for n in headers):
            headers["Authorization"] = f"Bearer {self.token}"
        https = self._parts.scheme == "https"
        connection_class = http.client.HTTPSConnection if https else http.client.HTTPConnection
        port = self._parts.port or (443 if https else 80)
        connection = connection_class(self._parts.hostname or "", port, timeout=self.timeout)
        try:
            # http.client adds Content-Length for a bytes body, even an empty one on POST.
            payload = body.encode("utf-8") if isinstance(body, str) else body
            path = self._parts.path.rstrip("/") + path
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            answer_headers = {name.lower(): value for name, value in response.getheaders()}
            return Reply(response.status, answer_headers, response.read())
        finally:
            connection.close()
