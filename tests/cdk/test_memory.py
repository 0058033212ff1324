"""Memory bounds under hostile load, measured on the resident memory of a real sink process.

Each test starts a sink (``processes.SINK_SCRIPT``), loads it from this process over
loopback for a bounded time, and compares its peak RSS (``VmHWM``, so no spike between
samples is missed) with its RSS before the load.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from processes import READY, SINK_SCRIPT, Process, sink_dir, start

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
PIPELINING_CONNECTIONS = 100
PIPELINING_SECONDS = 5.0


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of process ``pid`` from ``/proc/PID/status``, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for process {pid}")


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    return answer


async def _pipeline_without_reading(port: int, seconds: float) -> int:
    """``PIPELINING_CONNECTIONS`` clients writing pipelined ``GET /healthz`` as fast as the
    server takes them, for ``seconds``, never reading an answer; the bytes they wrote."""
    block = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 2000
    written = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def client() -> None:
        nonlocal written
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (left := deadline - loop.time()) > 0:
                writer.write(block)
                try:
                    await asyncio.wait_for(writer.drain(), left)
                except (TimeoutError, ConnectionError):
                    break
                written += len(block)
        finally:
            writer.transport.abort()

    await asyncio.gather(*(client() for _ in range(PIPELINING_CONNECTIONS)))
    return written


def test_pipelining_clients_that_read_no_answer_hold_little_memory(
    tmp_path: Path, started: list[Process]
) -> None:
    # Issue 20.4: each read of pipelined requests became thousands of queued Requests
    # (+196 MB for 100 such clients); now a connection parses one request ahead.
    sink = start(started, sink_dir(tmp_path), SINK_SCRIPT)
    port = int(sink.wait_for(READY).group(1))
    pid = sink.process.pid

    async def body() -> None:
        assert b" 200 " in await _get(port, "/healthz")
        before = rss_mib(pid)
        written = await _pipeline_without_reading(port, PIPELINING_SECONDS)
        peak = rss_mib(pid, "VmHWM")
        print(f"RSS {before:.1f} MiB -> peak {peak:.1f} MiB, {written / MIB:.0f} MiB sent")
        assert written > 4 * MIB  # the load reached the server
        assert peak - before <= 64, f"RSS grew by {peak - before:.1f} MiB"
        # Still serving once they are gone.
        assert b" 200 " in await _get(port, "/healthz")

    asyncio.run(asyncio.wait_for(body(), 60))
