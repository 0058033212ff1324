"""The live check behind ``--check``: can this connector, with this config, reach what it needs?

First the connector's own ``check()`` hook (plain or ``async def``; True or None is a yes,
False or an exception a no, with its message), then, for a source, each URL it delivers
to (``target``, and ``dead_letter_target`` when set): any HTTP answer there means the URL
is reachable, a refused connection, a TLS failure or silence does not. Nothing is
delivered and nothing of the service starts: the check suits an init container or CI.
"""

from __future__ import annotations

import logging
from typing import Any

from cdk.client import Client
from cdk.config import ConnectorConfig, DeliveryConfig, redact_url
from cdk.connector import Connector, call
from cdk.delivery import tls_context
from cdk.logs import one_line

__all__ = ["run_check"]

_log = logging.getLogger("cdk.check")


async def run_check(connector: Connector[Any], config: ConnectorConfig) -> dict[str, str]:
    """``{"status": "ok"}``, or ``{"status": "failed", "part": ..., "message": ...}``
    naming the first part that failed (``check``, ``target``, ``dead_letter_target``);
    configured secrets are masked in the message."""
    problem = await _first_problem(connector, config)
    if problem is None:
        return {"status": "ok"}
    part, message = problem
    return {"status": "failed", "part": part, "message": config.redact(message)}


async def _first_problem(
    connector: Connector[Any], config: ConnectorConfig
) -> tuple[str, str] | None:
    connector.config = config
    try:
        answer = await call(connector.check, thread=True)
    except Exception as exc:
        _log.debug("check() raised", exc_info=True)
        return "check", one_line(exc)
    if answer is False:
        return "check", "check() returned False"
    if isinstance(config, DeliveryConfig):
        for part in ("target", "dead_letter_target"):
            url = getattr(config, part)
            if url is not None:
                problem = await _unreachable(str(url), config)
                if problem is not None:
                    return part, problem
    return None


async def _unreachable(url: str, config: DeliveryConfig) -> str | None:
    """Why ``url`` gives no HTTP answer, or None when it answers (whatever its status)."""
    try:
        client = Client(url, limit=1, timeout=config.attempt_timeout, ssl=tls_context(config))
    except ValueError as exc:
        return str(exc)
    # OPTIONS, as the CloudEvents webhook spec's validation request: a receiver answers it
    # (200, or 405 when it serves only POST) and nothing takes it for an event. The
    # client writes POSTs, so the probe is its head with the method swapped.
    request = b"OPTIONS" + client.encode_request(b"", {"WebHook-Request-Origin": "cdk"})[4:]
    try:
        response = await client.send(request)
    except Exception as exc:
        return f"{redact_url(url)}: {one_line(exc)}"
    finally:
        await client.close()
    _log.debug("%s answered the check with %d", url, response.status)
    return None
