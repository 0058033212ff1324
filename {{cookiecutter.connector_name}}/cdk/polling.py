"""The polling loop: what the default ``Source.loop_produce_event`` runs.

A :class:`Poller` runs one producer per partition (one for a source without partitions).
Each calls ``make_event``, turns what it returned (an event, ``(event, position)``, or a
page of them) into Tuples whose positions a :class:`cdk.Checkpoint` records, puts them into
``chan`` in order, and waits ``interval`` (``idle_interval`` after a call that returned
nothing). A call that raises is retried with backoff while ``/readyz`` says why;
``cdk.FatalError`` ends the loop. :meth:`Poller.pause` holds every producer (an outage).

Which partitions run is decided at one seam: after each ``partitions()`` call,
:meth:`Poller.assign` runs :meth:`Poller.own` for each name :attr:`Poller.claim` keeps
(all of them, in one replica) and :meth:`Poller.lose` for each it no longer does. ``own``
starts the partition's producer from the position stored at that moment; ``lose`` stops it
(the events it queued are still delivered and their positions written). A per-partition
lease replaces ``claim`` and calls ``own`` / ``lose`` as it wins and loses partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cloudevents.core.v1.event import CloudEvent
from prometheus_client import Counter

from cdk.connector import FatalError, Source, Tuple, call
from cdk.delivery import Fenced, ShutdownError
from cdk.logs import one_line
from cdk.positions import KEY, Checkpoint, partition_key

if TYPE_CHECKING:
    from cdk.config import SourceConfig
    from cdk.metrics import Metrics
    from cdk.store import PositionStore

__all__ = ["Poller", "has_partitions"]

#: Seconds a producer waits after a call that returned nothing when that pause is 0.
IDLE_WAIT = 0.1
#: The backoff of a failing ``make_event`` / ``partitions``: doubled from the first to the last.
FIRST_BACKOFF, LAST_BACKOFF = 1.0, 60.0
#: The fewest seconds between two warnings that the same trouble lasts.
REMINDER = 30.0
#: How many partitions a log line names before it says "and N more".
_SHOWN = 20
_log = logging.getLogger("cdk.source")
_UNTRACKED = object()


def has_partitions(source: Source[Any]) -> bool:
    return type(source).partitions is not Source.partitions


@dataclass(slots=True)
class _Trouble:
    """A hook that keeps failing: when it began, when it was last said, the next wait."""

    what: str
    since: float | None = None
    warned: float = 0.0
    backoff: float = FIRST_BACKOFF
    reason: str = ""


@dataclass(slots=True)
class _Partition:
    name: str | None
    checkpoint: Checkpoint
    task: asyncio.Task[None] | None = None
    trouble: _Trouble = field(default_factory=lambda: _Trouble("make_event"))


class Poller:
    """Runs a source's ``make_event`` (per partition) into ``chan`` until cancelled."""

    def __init__(
        self,
        source: Source[Any],
        store: PositionStore,
        config: SourceConfig,
        metrics: Metrics,
    ) -> None:
        self.source, self.store, self.config = source, store, config
        self.partitioned = has_partitions(source)
        #: Which of the names ``partitions()`` returned this replica produces.
        self.claim: Callable[[Sequence[str]], Iterable[str]] = lambda names: names
        self.running: dict[str | None, _Partition] = {}
        self.failures = Counter(
            "cdk_make_event_failures",
            "Calls of make_event (or partitions) that raised.",
            registry=metrics.registry,
        )
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._paused = ""
        self._refresh = _Trouble("partitions()")
        self._fatal: asyncio.Future[None] | None = None

    def trouble(self) -> str:
        """Why production is held back now ("" when it is not): for ``/readyz``."""
        if self._paused:
            return self._paused
        troubles = [self._refresh, *(p.trouble for p in self.running.values())]
        return next((t.reason for t in troubles if t.reason), "")

    def pause(self, reason: str) -> None:
        """Hold every producer before its next call until :meth:`resume`."""
        self._paused = reason
        self._resumed.clear()

    def resume(self) -> None:
        self._paused = ""
        self._resumed.set()

    async def run(self) -> None:
        """Produce until cancelled; raises the first :class:`cdk.FatalError`."""
        self._fatal = asyncio.get_running_loop().create_future()
        try:
            if not self.partitioned:
                await self.own(None)
                await self._fatal
            while True:
                names = await self._partitions()
                if names is not None:
                    await self.assign(names)
                refresh = self.config.partition_refresh
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._fatal), refresh)
        finally:
            for name in list(self.running):
                await self.lose(name)

    async def assign(self, names: Sequence[str]) -> None:
        """Own what :attr:`claim` keeps of ``names``; lose the partitions it no longer does."""
        wanted = list(dict.fromkeys(self.claim(names)))
        gone = [name for name in self.running if name not in wanted]
        for name in gone:
            await self.lose(name)
            if name is not None:
                self.source.positions.pop(name, None)
        new = [name for name in wanted if name not in self.running]
        for name in new:
            await self.own(name)
        if new or gone:
            started = [f"{name} ({_where(self.running[name].checkpoint.position)})" for name in new]
            _log.info(
                "partitions: %d running; started %s; stopped %s",
                len(self.running),
                _names(started),
                _names([str(name) for name in gone]),
            )

    async def own(self, name: str | None) -> None:
        """Start producing partition ``name`` (None: the source's only one) from the
        position stored now."""
        if name is None:
            checkpoint = self.source.checkpoint
            if checkpoint is None:  # made by the service; a Poller on its own makes its own
                checkpoint = await asyncio.to_thread(Checkpoint, self.store, KEY)
            self.source.position = checkpoint.position
            _log.info("producing from %s", _where(checkpoint.position))
        else:
            key = partition_key(name)
            checkpoint = await asyncio.to_thread(Checkpoint, self.store, key)
            self.source.positions[name] = checkpoint.position
        part = _Partition(name, checkpoint)
        part.task = asyncio.create_task(self._produce(part), name=f"cdk-produce-{name or ''}")
        part.task.add_done_callback(self._ended)
        self.running[name] = part

    async def lose(self, name: str | None) -> None:
        """Stop producing partition ``name``; what it queued is still delivered."""
        part = self.running.pop(name, None)
        if part is None or part.task is None:
            return
        part.task.cancel()
        await asyncio.wait({part.task})

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._fatal is None or self._fatal.done():
            return
        error = task.exception()
        if error is not None:
            self._fatal.set_exception(error)

    async def _partitions(self) -> list[str] | None:
        """What ``partitions()`` returns now; None when it failed (retried at the next refresh,
        or sooner by its backoff while no partition runs)."""
        while True:
            try:
                names = await call(self.source.partitions, thread=True)
                if isinstance(names, str) or not all(isinstance(n, str) for n in names or ()):
                    raise FatalError(f"partitions() must return a list of str, not {names!r:.80}")
            except FatalError:
                raise
            except Exception as exc:
                wait = self._failed(self._refresh, exc)
                if self.running:
                    return None
                await asyncio.sleep(wait)
                continue
            self._healed(self._refresh)
            return list(names or ())

    async def _produce(self, part: _Partition) -> None:
        source, config = self.source, self.config
        idle = config.interval if config.idle_interval is None else config.idle_interval
        args = () if part.name is None else (part.name,)
        while True:
            await self._resumed.wait()
            try:
                page = _page(await call(source.make_event, *args, thread=True))
            except FatalError:
                raise
            except Exception as exc:
                await asyncio.sleep(self._failed(part.trouble, exc, part.name))
                continue
            self._healed(part.trouble, part.name)
            for event, position in page:
                item = _logged(event)
                if position is not _UNTRACKED:
                    try:
                        item = part.checkpoint.tuple(event, position, item.success, item.failed)
                    except TypeError as exc:  # not JSON: no retry makes it one
                        raise FatalError(f"make_event: {exc}") from None
                    if part.name is None:
                        source.position = position
                    else:
                        source.positions[part.name] = position
                await source.chan.put(item)  # the source's: a test kit may stand in for it
            await asyncio.sleep(config.interval if page else (idle or IDLE_WAIT))

    def _failed(self, trouble: _Trouble, exc: Exception, name: str | None = None) -> float:
        """Count and say (once, then every REMINDER s) that a hook raised; the seconds to
        wait before calling it again."""
        loop = asyncio.get_running_loop()
        now, what = loop.time(), _label(trouble.what, name)
        self.failures.inc()
        why = one_line(exc)
        trouble.reason = f"{what} fails: {type(exc).__name__}"
        if trouble.since is None:
            trouble.since, trouble.warned, trouble.backoff = now, now, FIRST_BACKOFF
            _log.warning("%s failed: %s; calling it again with backoff", what, why)
            _log.debug("%s raised", what, exc_info=exc)
        elif now - trouble.warned >= REMINDER:
            trouble.warned = now
            _log.warning("%s still fails, for %.0f s: %s", what, now - trouble.since, why)
        wait, trouble.backoff = trouble.backoff, min(LAST_BACKOFF, trouble.backoff * 2)
        return wait

    def _healed(self, trouble: _Trouble, name: str | None = None) -> None:
        if trouble.since is not None:
            seconds = asyncio.get_running_loop().time() - trouble.since
            _log.info("%s succeeds again, after %.1f s", _label(trouble.what, name), seconds)
            trouble.since, trouble.reason = None, ""


def _page(made: Any) -> list[tuple[CloudEvent, Any]]:
    """What ``make_event`` returned as ``(event, position or _UNTRACKED)`` pairs."""
    if made is None:
        return []
    items = made if isinstance(made, list) else [made]
    page = []
    for item in items:
        if isinstance(item, CloudEvent):
            page.append((item, _UNTRACKED))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], CloudEvent):
            page.append(item)
        else:
            raise FatalError(
                "make_event must return None, an event, (event, position) or a list of"
                f" those, not {type(item).__name__}"
            )
    return page


def _logged(event: CloudEvent) -> Tuple:
    """A Tuple whose callbacks log the outcome (the article's "send event success: id")."""
    event_id = event.get_id()
    ids = {"event_ids": [event_id]}
    return Tuple(
        event,
        lambda: _log.info("send event success: %s", event_id, extra=ids),
        lambda error: _log.log(
            _level(error), "send event failed: %s: %s", event_id, error, extra=ids
        ),
    )


def _level(error: BaseException) -> int:
    # An event fenced off (another replica leads now and sends it) or left unsent by a stop
    # is no failure to warn of once per event: the checkpoint and delivery say so once.
    return logging.DEBUG if isinstance(error, Fenced | ShutdownError) else logging.WARNING


def _label(what: str, name: str | None) -> str:
    return what if name is None else f"{what}({name!r})"


def _where(position: Any) -> str:
    return "the start (no stored position)" if position is None else f"after position {position!r}"


def _names(names: list[str]) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more
