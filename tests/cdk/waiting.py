"""Waiting on a condition in async tests, bounded, instead of sleeping for a guessed time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Return once ``predicate()`` holds, checking every 10 ms; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
