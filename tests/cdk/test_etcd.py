"""The etcd position store and leader election, against real etcd processes on loopback.

The store's get/set/delete contract runs in test_store.py over every backend; this file
holds what is etcd's own: configuration, reaching the cluster (failover, auth, a member
killed mid-stream) and leader election with fenced writes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_support import (
    EtcdCluster,
    b64,
    free_port,
    gateway,
    read_key,
    require_etcd_binary,
)

from cdk.config import ConfigError, SourceConfig, load_config
from cdk.etcd import Access, EtcdBackend, Leadership
from cdk.store import NotLeader, PositionStore, StoreError

TEMPLATE_PROJECT = Path(__file__).resolve().parents[2] / "{{cookiecutter.connector_name}}"
TARGET = "http://127.0.0.1:1/"
#: Short leases keep each test to seconds; the bounds below are multiples of it.
LEASE = 2.0


def write_config(tmp_path: Path, config: str, secret: str = "") -> tuple[Path, Path]:
    (tmp_path / "config.yml").write_text(f"target: {TARGET}\n{config}", encoding="utf-8")
    (tmp_path / "secret.yml").write_text(secret, encoding="utf-8")
    return tmp_path / "config.yml", tmp_path / "secret.yml"


def config_problems(tmp_path: Path, config: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(SourceConfig, *write_config(tmp_path, config), environ={})
    return caught.value.problems


@pytest.fixture
def own_member(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One etcd member of this test's own, which it may kill and restart."""
    with EtcdCluster(require_etcd_binary(), tmp_path / "etcd") as cluster:
        yield cluster


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["etcd://127.0.0.1:2379/x", "etcds://a.example:2379,b.example:2380/x/y", "etcd://[::1]:1/p"],
)
def test_etcd_urls_are_accepted(tmp_path: Path, url: str) -> None:
    config = load_config(SourceConfig, *write_config(tmp_path, f"position_store: '{url}'\n"))
    assert config.position_store == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("sqlite:///p.db", "must be a file path or an etcd:// or etcds:// URL, not sqlite://"),
        ("file:///var/p.db", "not file://"),
        ("etcd://127.0.0.1/x", "endpoint '127.0.0.1' is not HOST:PORT"),
        ("etcd://127.0.0.1:99999/x", "endpoint '127.0.0.1:99999' is not HOST:PORT"),
        ("etcd://a:1,,b:2/x", "endpoint '' is not HOST:PORT"),
        ("etcd://127.0.0.1:2379", "needs a key prefix"),
        ("etcd://127.0.0.1:2379/", "needs a key prefix"),
        ("etcd://127.0.0.1:2379/x?y=1", "needs a key prefix"),
        ("etcd://user:pw@127.0.0.1:2379/x", "must not hold credentials"),
        ("''", "must not be empty"),
    ],
)
def test_other_position_store_urls_are_refused_at_load(
    tmp_path: Path, url: str, problem: str
) -> None:
    # Before, etcd://127.0.0.1:2379/x was taken for an SQLite file named "etcd:".
    [line] = config_problems(tmp_path, f"position_store: {url}\n")
    assert line.startswith("config: position_store: ") and problem in line


def test_leader_election_needs_an_etcd_store(tmp_path: Path) -> None:
    needs = "config: leader_election: needs an etcd:// or etcds:// position_store"
    assert config_problems(tmp_path, "leader_election: true\n")[0].startswith(needs)
    problems = config_problems(tmp_path, "leader_election: true\nposition_store: p.db\n")
    assert problems[0].startswith(needs)
    assert "leader_lease" in config_problems(tmp_path, "leader_lease: 1\n")[0]
    config = load_config(
        SourceConfig,
        *write_config(tmp_path, "position_store: etcd://h:1/x\nleader_election: true\n"),
    )
    assert (config.leader_election, config.leader_lease) == (True, 10.0)


def test_etcd_login_comes_from_secret_yml(tmp_path: Path) -> None:
    config = load_config(
        SourceConfig,
        *write_config(
            tmp_path,
            "position_store: etcd://h:1/x\n",
            "etcd_username: app\netcd_password: s3cr3t\n",
        ),
    )
    assert Access.from_config(config) == Access(("app", "s3cr3t"), None)
    assert "s3cr3t" not in repr(config)


# --- reaching etcd ------------------------------------------------------------------------


def test_unreachable_store_at_start_names_every_endpoint() -> None:
    first, second = free_port(), free_port()  # nothing listens there
    with pytest.raises(StoreError) as caught:
        PositionStore("source-a", f"etcd://127.0.0.1:{first},127.0.0.1:{second}/x")
    message = str(caught.value)
    assert message.startswith("position store etcd://127.0.0.1:")
    assert "no endpoint answered" in message
    assert f"127.0.0.1:{first}: [Errno 111] Connection refused" in message
    assert f"127.0.0.1:{second}: [Errno 111] Connection refused" in message


def test_store_fails_over_past_a_dead_endpoint(etcd: EtcdCluster) -> None:
    url = f"etcd://127.0.0.1:{free_port()},{etcd.members[0].endpoint}/failover"
    with PositionStore("source-a", url) as store:
        store.set("offset", 5)
        assert store.get("offset") == 5
    assert (read_key(etcd.members[0].endpoint, "/failover/source-a/offset") or {})["value"] == "5"


def test_store_fails_over_past_a_silent_member_within_the_timeout(
    etcd_cluster: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cdk.etcd

    monkeypatch.setattr(cdk.etcd, "REQUEST_TIMEOUT", 0.5)
    leader = etcd_cluster.leader()
    silent, *others = [m for m in etcd_cluster.members if m is not leader] + [leader]
    with PositionStore("source-a", etcd_cluster.url("silent", [silent, *others])) as store:
        store.set("offset", 1)
        silent.pause()  # connections stay open, nothing answers: a partition
        store.set("offset", 2)
        assert store.get("offset") == 2
    with pytest.raises(StoreError, match=rf"{silent.endpoint}: timed out"):
        EtcdBackend(etcd_cluster.url("silent", [silent]))


def test_store_lost_while_running_raises_then_recovers(own_member: EtcdCluster) -> None:
    member = own_member.members[0]
    with PositionStore("source-a", own_member.url("lost")) as store:
        store.set("offset", 1)
        member.kill()
        with pytest.raises(StoreError, match=rf"{member.endpoint}: \[Errno 111\]"):
            store.set("offset", 2)
        member.restart()
        assert own_member.wait_healthy()
        store.set("offset", 3)  # what the checkpoint writer's retry does
        assert store.get("offset") == 3


def test_store_signs_in_with_the_login_from_secret_yml(
    own_member: EtcdCluster, tmp_path: Path
) -> None:
    endpoint = own_member.members[0].endpoint
    for user, password in (("root", "rootpw"), ("app", "apppw")):
        gateway(endpoint, "auth/user/add", {"name": user, "password": password})
    gateway(endpoint, "auth/role/add", {"name": "root"})
    gateway(endpoint, "auth/user/grant", {"user": "root", "role": "root"})
    gateway(endpoint, "auth/role/add", {"name": "positions"})
    permission = {"permType": "READWRITE", "key": b64("/app/"), "range_end": b64("/app0")}
    gateway(endpoint, "auth/role/grant", {"name": "positions", "perm": permission})
    gateway(endpoint, "auth/user/grant", {"user": "app", "role": "positions"})
    gateway(endpoint, "auth/enable", {})
    url = f"position_store: {own_member.url('app')}\n"

    def open_store(secret: str) -> PositionStore:
        config = load_config(SourceConfig, *write_config(tmp_path, url, secret), environ={})
        return PositionStore.from_config(config, "source-a")

    with pytest.raises(StoreError, match="user name is empty"):
        open_store("")
    with pytest.raises(StoreError, match="authentication failed"):
        open_store("etcd_username: app\netcd_password: wrong\n")
    with open_store("etcd_username: app\netcd_password: apppw\n") as store:
        store.set("offset", 1)
        # Changing a password ends the user's sessions: the store signs in again by itself.
        root = gateway(endpoint, "auth/authenticate", {"name": "root", "password": "rootpw"})
        change = {"name": "app", "password": "apppw"}
        gateway(endpoint, "auth/user/changepw", change, token=root["token"])
        store.set("offset", 2)
        assert store.get("offset") == 2


def test_etcds_checks_the_certificate_against_etcd_ca_file(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    files = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(files[0]))
    issued.cert_chain_pems[0].write_to_path(str(files[1]))
    issued.private_key_pem.write_to_path(str(files[2]))
    with EtcdCluster(require_etcd_binary(), tmp_path / "etcd", tls=files[1:]) as cluster:
        url = f"position_store: etcds://127.0.0.1:{cluster.members[0].tls_port}/tls\n"
        config = load_config(SourceConfig, *write_config(tmp_path, url), environ={})
        with pytest.raises(StoreError, match="certificate verify failed"):
            PositionStore.from_config(config, "source-a")
        trusted = config.model_copy(update={"etcd_ca_file": str(files[0])})
        with PositionStore.from_config(trusted, "source-a") as store:
            store.set("offset", 1)
            assert store.get("offset") == 1


def test_cluster_member_killed_mid_stream_loses_no_write(etcd_cluster: EtcdCluster) -> None:
    # The store talks to the raft leader first, so killing it costs both a failover and
    # an election while writes go on.
    leader = etcd_cluster.leader()
    others = [m for m in etcd_cluster.members if m is not leader]
    store = PositionStore("source-a", etcd_cluster.url("stream", [leader, *others]))
    count, kill_at = 200, 50
    halfway, failures, written = threading.Event(), [], []

    def writer() -> None:
        for n in range(count):
            if n == kill_at:
                halfway.set()
            for _ in range(20):  # like the checkpoint writer: retry until it is stored
                try:
                    store.set(f"n{n}", n)
                except StoreError as exc:
                    failures.append(str(exc))
                    continue
                written.append(n)
                break

    thread = threading.Thread(target=writer)
    thread.start()
    assert halfway.wait(timeout=30)
    leader.kill()
    thread.join(timeout=60)
    assert written == list(range(count)), failures
    with PositionStore("source-a", etcd_cluster.url("stream", others)) as survivor:
        assert [survivor.get(f"n{n}") for n in range(count)] == list(range(count))
    store.close()


# --- leader election ----------------------------------------------------------------------


def leadership(url: str, identity: str, lease: float = LEASE) -> Leadership:
    elected = Leadership(url, "source-a", lease)
    elected.identity = identity
    return elected


def leader_key(url: str) -> str:
    return "/" + url.rsplit("/", 1)[1] + "/source-a.leader"


def test_two_campaigners_only_one_leads(etcd: EtcdCluster, etcd_url: str) -> None:
    endpoint = etcd.members[0].endpoint

    async def scenario() -> None:
        a, b = leadership(etcd_url, "a"), leadership(etcd_url, "b")
        tasks = {asyncio.create_task(a.campaign()): a, asyncio.create_task(b.campaign()): b}
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        (first,), (waiting,) = [tasks[t] for t in done], [tasks[t] for t in pending]
        assert first.is_leader and not waiting.is_leader
        assert (read_key(endpoint, leader_key(etcd_url)) or {})["value"] == first.identity
        # The leader renews its lease: the other still waits after more than a lease.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(next(iter(pending))), LEASE * 1.5)
        assert first.is_leader
        await first.resign()
        await asyncio.wait_for(next(iter(pending)), LEASE)  # resigning hands over at once
        assert waiting.is_leader and not first.is_leader
        assert (read_key(endpoint, leader_key(etcd_url)) or {})["value"] == waiting.identity
        await waiting.resign()

    asyncio.run(scenario())


CAMPAIGNER = """
import asyncio, sys
from cdk.etcd import Leadership

async def main():
    leader = Leadership(sys.argv[1], "source-a", float(sys.argv[2]))
    leader.identity = "killed"
    await leader.campaign()
    print("leading", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_killed_leaders_lease_ends_and_another_leads_within_a_lease(etcd_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(TEMPLATE_PROJECT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CAMPAIGNER, etcd_url, str(LEASE)],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"leading\n"

        async def scenario() -> float:
            follower = leadership(etcd_url, "follower")
            campaign = asyncio.create_task(follower.campaign())
            child.send_signal(signal.SIGKILL)  # no resign: only the lease's end frees the key
            killed = time.monotonic()
            await asyncio.wait_for(campaign, LEASE * 3)
            took = time.monotonic() - killed
            await follower.resign()
            return took

        took = asyncio.run(scenario())
    finally:
        child.kill()
        child.wait()
    # The lease ends at most a lease after the last renewal (etcd looks for expired leases
    # every 0.5 s), the vacancy is noticed within an eighth of a lease; the rest is slack
    # for a loaded machine. bench_store.py measures the figures.
    assert took < LEASE * 2


def test_revoked_lease_deposes_the_leader_and_another_leads(
    etcd: EtcdCluster, etcd_url: str
) -> None:
    endpoint = etcd.members[0].endpoint

    async def scenario() -> None:
        a, b = leadership(etcd_url, "a"), leadership(etcd_url, "b")
        await a.campaign()
        lease = (read_key(endpoint, leader_key(etcd_url)) or {})["lease"]
        gateway(endpoint, "lease/revoke", {"ID": lease})  # etcd ended the lease
        await asyncio.wait_for(b.campaign(), LEASE)
        await asyncio.wait_for(a.lost(), LEASE)  # a's next renewal learns it
        assert b.is_leader and not a.is_leader
        await b.resign()

    asyncio.run(scenario())


def test_leader_cut_off_from_etcd_stops_leading_before_its_lease_ends(
    etcd_cluster: EtcdCluster,
) -> None:
    # Its member is a raft follower, so the others go on without an election.
    leader = etcd_cluster.leader()
    alone, *rest = [m for m in etcd_cluster.members if m is not leader] + [leader]
    cut_off_url, others_url = etcd_cluster.url("cut", [alone]), etcd_cluster.url("cut", rest)

    async def scenario() -> None:
        a, b = leadership(cut_off_url, "a"), leadership(others_url, "b")
        await a.campaign()
        # Frozen, its member holds a's connections open and silent: renewals time out.
        alone.pause()
        await asyncio.wait_for(a.lost(), LEASE)
        # etcd still holds a's key: a gave up before the lease could end on the server.
        assert (read_key(rest[0].endpoint, "/cut/source-a.leader") or {})["value"] == "a"
        assert not a.is_leader
        await asyncio.wait_for(b.campaign(), LEASE * 2)
        await b.resign()

    asyncio.run(scenario())


def test_paused_leader_knows_it_may_have_lost_the_lease(etcd_url: str) -> None:
    async def scenario() -> None:
        a = leadership(etcd_url, "a")
        await a.campaign()
        # The fault under test: the whole process stalls (GC, swap, SIGSTOP) past 3/4 of
        # a lease. Nothing can renew meanwhile; the clock alone says the lease may be gone.
        time.sleep(LEASE * 0.8)
        assert not a.is_leader
        with pytest.raises(NotLeader):
            a.fence()
        await asyncio.wait_for(a.lost(), LEASE)

    asyncio.run(scenario())


def test_fencing_refuses_a_deposed_leaders_late_write(etcd: EtcdCluster, etcd_url: str) -> None:
    endpoint = etcd.members[0].endpoint
    prefix = etcd_url.rsplit("/", 1)[1]

    async def scenario() -> None:
        # A long lease: a renews rarely, so it still believes it leads after etcd
        # ended its lease, as a leader cut off or paused would.
        a = leadership(etcd_url, "a", lease=60)
        await a.campaign()
        a_store = PositionStore("source-a", backend=EtcdBackend(etcd_url, a))
        await asyncio.to_thread(a_store.set, "offset", 1)
        lease = (read_key(endpoint, leader_key(etcd_url)) or {})["lease"]
        gateway(endpoint, "lease/revoke", {"ID": lease})

        b = leadership(etcd_url, "b")
        await asyncio.wait_for(b.campaign(), LEASE)
        config = SourceConfig.model_validate(
            {"target": TARGET, "position_store": etcd_url, "leader_election": True}
        )
        b_store = PositionStore.from_config(config, "source-a", b)
        await asyncio.to_thread(b_store.set, "offset", 2)

        assert a.is_leader  # a has not noticed yet: only etcd's check stops its write
        with pytest.raises(NotLeader, match="a no longer leads"):
            await asyncio.to_thread(a_store.set, "offset", 99)
        with pytest.raises(NotLeader):
            await asyncio.to_thread(a_store.delete, "offset")
        await asyncio.wait_for(a.lost(), 1)  # the refused write deposed it at once
        assert (read_key(endpoint, f"/{prefix}/source-a/offset") or {})["value"] == "2"
        assert a_store.get("offset") == 2  # reads are not fenced
        await b.resign()
        with pytest.raises(NotLeader, match="b does not lead"):
            b_store.set("offset", 3)  # refused before asking etcd
        a_store.close()
        b_store.close()

    asyncio.run(scenario())


def test_campaign_waits_out_an_etcd_outage(own_member: EtcdCluster) -> None:
    member = own_member.members[0]

    async def scenario() -> None:
        a = leadership(own_member.url("outage"), "a")
        member.kill()
        campaign = asyncio.create_task(a.campaign())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(campaign), LEASE / 2)
        member.restart()
        await asyncio.wait_for(campaign, 30)
        assert a.is_leader
        await a.resign()

    asyncio.run(scenario())
