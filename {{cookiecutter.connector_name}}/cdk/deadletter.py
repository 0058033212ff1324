"""A sink's dead letters: events ``arrived`` refused for good go to ``dead_letter_target``.

:class:`DeadLetters` hands them to the delivery engine (:class:`cdk.delivery.Deliverer`),
so they are sent as a source sends its own dead letters: with the Knative extensions
(:func:`cdk.delivery.error_extensions`), the source's retry rules and its defaults
(``send_event_attempts``, backoff, ``attempt_timeout``). The sink's request waits for them:
an event counts as handled only once the dead-letter target took it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from cdk.codec import AnyCloudEvent, with_extensions
from cdk.config import DeliveryConfig
from cdk.connector import Tuple
from cdk.delivery import Deliverer, DeliveryQueue, error_extensions
from cdk.metrics import Metrics

if TYPE_CHECKING:
    from cdk.config import SinkConfig

__all__ = ["DeadLetters"]

_log = logging.getLogger("cdk.sink")


class DeadLetters:
    """Sends refused events to ``config.dead_letter_target``; ``dest`` names the sink in
    ``knativeerrordest``. :meth:`start` on the event loop before :meth:`send`."""

    def __init__(self, config: SinkConfig, dest: str, metrics: Metrics) -> None:
        assert config.dead_letter_target is not None
        token = config.dead_letter_auth_token
        delivery = DeliveryConfig.model_validate(
            {"target": config.dead_letter_target, "target_auth_token": token}
        )
        self._redact = config.redact
        self._dest = dest
        self._counted = metrics.sink_dead_lettered
        # The engine's own series stay private: the sink's metrics count what it took, by code.
        self._deliverer = Deliverer(delivery, Metrics(dest, receiving=False))
        self._chan = DeliveryQueue(delivery.queue_size)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._deliverer.run(self._chan), name="cdk-dead-letters")

    async def send(self, letters: Sequence[tuple[AnyCloudEvent, int, str]]) -> list[bool]:
        """Send each ``(event, code, message)``; per letter, whether the dead-letter target
        took it (why not is logged)."""
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[bool]] = []
        for event, code, message in letters:
            done: asyncio.Future[bool] = loop.create_future()
            data = self._redact(message).encode("utf-8")
            extensions = error_extensions(self._dest, code, data)
            try:
                lettered = with_extensions(event, extensions)
            except ValueError:  # decoded by the codec, it passes; if not, the sender retries
                _log.exception("event %s cannot be dead-lettered", event.get_id())
                done.set_result(False)
            else:
                await self._chan.put(Tuple(lettered, partial(_took, done), partial(_lost, done)))
            waiting.append(done)
        took = list(await asyncio.gather(*waiting))
        for (_, code, _), ok in zip(letters, took, strict=True):
            if ok:
                self._counted.labels(str(code)).inc()
        return took

    async def close(self, grace: float) -> None:
        """Settle what is on its way within ``grace`` seconds, then close the connections."""
        await self._deliverer.stop(grace)
        if self._task is not None:
            await asyncio.wait({self._task})


def _took(done: asyncio.Future[bool]) -> None:
    if not done.done():
        done.set_result(True)


def _lost(done: asyncio.Future[bool], error: BaseException) -> None:
    # The delivery engine logged why; the sink's answer says to send again.
    if not done.done():
        done.set_result(False)
