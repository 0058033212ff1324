"""Fixtures of the kit's tests: connector processes and a plain HTTP target."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from processes import HangingTarget, Process, Target


@pytest.fixture
def started() -> Iterator[list[Process]]:
    """Connectors a test started; any still running at the end are killed."""
    processes: list[Process] = []
    yield processes
    for process in processes:
        process.kill()


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target()
    yield server
    server.close()


@pytest.fixture
def hanging() -> Iterator[HangingTarget]:
    """A target that never answers."""
    server = HangingTarget()
    yield server
    server.close()
