"""Memory under a burst: a sink process whose ``arrived`` is blocked takes 100 large batches.

Run: ``python tests/benchmarks/bench_burst.py [--requests 100] [--arrived async|sync]``

A sink (the kit's Receiver, SinkHandler and HTTP server with the default SinkConfig, on
uvloop) runs in its own process; its ``arrived`` waits until the driver releases it.
The driver opens ``--requests`` connections at once, each POSTing one batch of about
1 MiB (3,300 small events), and meanwhile asks ``GET /healthz`` every 50 ms. Once every
request was either answered or is held by the blocked ``arrived``, it reads the sink's
resident memory (RSS, from /proc), releases ``arrived``, waits for every answer, and
reads the RSS again a second later. Printed: the RSS before, at its peak (``VmHWM``) and
after the burst, the answers by status, and the slowest ``/healthz`` answer during it.
Target (issue 12): under 500 MiB of growth, and ``/healthz`` answering throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.dont_write_bytecode = True  # keep __pycache__ out of the template directory
TEMPLATE_PROJECT = Path(__file__).resolve().parents[2] / "{{cookiecutter.connector_name}}"
if str(TEMPLATE_PROJECT) not in sys.path:
    sys.path.insert(0, str(TEMPLATE_PROJECT))

TARGET_GROWTH_MIB = 500


def serve(port: int, gate: Path, kind: str) -> None:
    """The sink process: ``arrived`` returns once the file ``gate`` exists."""
    import uvloop

    import cdk
    from cdk.config import SinkConfig
    from cdk.metrics import Metrics
    from cdk.receiver import Receiver, SinkHandler

    class Blocked(cdk.Sink):
        async def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
            while not gate.exists():
                await asyncio.sleep(0.05)
            return cdk.SUCCESS

    class BlockedSync(cdk.Sink):
        def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
            while not gate.exists():
                time.sleep(0.05)
            return cdk.SUCCESS

    async def main() -> None:
        config = SinkConfig.model_validate({"port": port, "host": "127.0.0.1"})
        metrics = Metrics("burst")
        sink = Blocked() if kind == "async" else BlockedSync()
        receiver = Receiver(SinkHandler(sink, metrics), config, metrics)
        server = receiver.http_server()
        await server.start()
        receiver.ready = True
        print("ready", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


def batch_body() -> bytes:
    import orjson
    from bench_sink import event_json

    return orjson.dumps([event_json(n) for n in range(3300)])


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


async def post(port: int, body: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST / HTTP/1.1\r\nHost: burst\r\nContent-Type: application/cloudevents-batch+json"
        f"\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        writer.write(head + body)
        await writer.drain()
        line = await reader.readline()
    except (ConnectionError, OSError):
        return 0
    finally:
        writer.close()
    return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0


async def health(port: int, stop: asyncio.Event) -> tuple[float, int]:
    """Ask /healthz until ``stop``; the slowest answer in seconds, and failures."""
    slowest, failures = 0.0, 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: burst\r\nConnection: close\r\n\r\n")
            line = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            if not line.startswith(b"HTTP/1.1 200"):
                failures += 1
        except (OSError, TimeoutError):
            failures += 1
        slowest = max(slowest, time.monotonic() - started)
        await asyncio.sleep(0.05)
    return slowest, failures


async def burst(port: int, pid: int, gate: Path, requests: int) -> None:
    body = batch_body()
    before = rss_mib(pid)
    stop = asyncio.Event()
    checker = asyncio.create_task(health(port, stop))
    posts = [asyncio.create_task(post(port, body)) for _ in range(requests)]
    # Wait until the answered requests and the ones held by arrived account for all of them
    # (the RSS then stops moving), at most 30 s.
    deadline = time.monotonic() + 30
    last, steady_since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        now = rss_mib(pid)
        if abs(now - last) > 1:
            last, steady_since = now, time.monotonic()
        elif time.monotonic() - steady_since > 1.5:
            break
    held = rss_mib(pid)
    gate.touch()
    statuses = Counter(await asyncio.gather(*posts))
    await asyncio.sleep(1.0)
    stop.set()
    slowest, failures = await checker
    after = rss_mib(pid)
    peak = rss_mib(pid, "VmHWM")
    print(f"{requests} requests of {len(body) / 2**20:.2f} MiB, arrived blocked")
    print(f"  RSS before      {before:8.1f} MiB")
    print(f"  RSS held        {held:8.1f} MiB  (+{held - before:.1f})")
    print(f"  RSS peak        {peak:8.1f} MiB  (+{peak - before:.1f})")
    print(f"  RSS after       {after:8.1f} MiB  (+{after - before:.1f}, 1 s after the burst)")
    print(f"  answers         {dict(sorted(statuses.items()))}  (0: no answer)")
    print(f"  /healthz        slowest {slowest * 1000:.0f} ms, {failures} failed")
    verdict = "PASS" if peak - before < TARGET_GROWTH_MIB and failures == 0 else "FAIL"
    print(f"  target: growth under {TARGET_GROWTH_MIB} MiB, /healthz always answered: {verdict}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--gate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--arrived", choices=["async", "sync"], default="async")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.gate, args.arrived)
        return 0
    from cdk.testing.target import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        gate = Path(tmp) / "release"
        argv = [__file__, "--serve", str(port), "--gate", str(gate), "--arrived", args.arrived]
        proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError("the sink did not start")
            time.sleep(0.5)
            asyncio.run(burst(port, proc.pid, gate, args.requests))
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"  (arrived: {args.arrived}; pid {os.getpid()} drove it)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
