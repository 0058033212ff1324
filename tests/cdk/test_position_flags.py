"""--positions, --set-position and --reset-positions against real stores (SQLite and etcd),
with the connector stopped and running (the changes are refused, exit 2, while it runs)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from processes import POLL_SCRIPT, Process, Target, run, start
from test_polling import ROWS_SCRIPT

EXIT_CONFIG = 2


def write_config(tmp_path: Path, store: str, target: str = "http://127.0.0.1:9/") -> None:
    (tmp_path / "config.yml").write_text(
        f"target: {target}\nposition_store: {store}\ninterval: 0.02\n", encoding="utf-8"
    )


def positions(tmp_path: Path, script: str = POLL_SCRIPT, **env: str) -> object:
    result = run(tmp_path, script, "--positions", **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_positions_are_shown_set_and_reset_while_the_source_is_stopped(
    tmp_path: Path, target: Target
) -> None:
    write_config(tmp_path, "state/positions.db", target.url)
    assert positions(tmp_path) == {"position": None}
    changed = run(tmp_path, POLL_SCRIPT, "--set-position", "7")
    assert changed.returncode == 0, changed.stderr
    assert changed.stderr.strip().endswith("Numbers changed by hand: position: None -> 7")
    assert positions(tmp_path) == {"position": 7}
    # The next run resumes after it, and says so.
    resumed = run(tmp_path, POLL_SCRIPT, "--max-events", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert "producing from after position 7" in resumed.stderr
    assert sorted(headers["ce-id"] for headers, _ in target.requests) == ["n8", "n9"]
    assert positions(tmp_path) == {"position": 9}
    reset = run(tmp_path, POLL_SCRIPT, "--reset-positions")
    assert reset.returncode == 0, reset.stderr
    assert "position: 9 -> None" in reset.stderr
    assert positions(tmp_path) == {"position": None}
    text = run(tmp_path, POLL_SCRIPT, "--set-position", "not json")
    assert text.returncode == 0 and positions(tmp_path) == {"position": "not json"}


def test_partition_positions_by_hand(tmp_path: Path) -> None:
    write_config(tmp_path, "positions.db")
    env = {"PARTITIONS": "a,b"}
    assert run(tmp_path, ROWS_SCRIPT, "--set-position", "a=5", **env).returncode == 0
    assert run(tmp_path, ROWS_SCRIPT, "--set-position", 'b={"id": 3}', **env).returncode == 0
    assert positions(tmp_path, ROWS_SCRIPT, **env) == {"a": 5, "b": {"id": 3}}
    bare = run(tmp_path, ROWS_SCRIPT, "--set-position", "5", **env)
    assert bare.returncode == EXIT_CONFIG
    assert "this source has partitions: --set-position PARTITION=VALUE" in bare.stderr
    one = run(tmp_path, ROWS_SCRIPT, "--reset-positions", "a", **env)
    assert one.returncode == 0, one.stderr
    assert "partitions reset ('a': 5 -> None)" in one.stderr
    assert positions(tmp_path, ROWS_SCRIPT, **env) == {"b": {"id": 3}}


def refused_while_running(tmp_path: Path, started: list[Process], store: str, target: str) -> None:
    """Start the source, check that changes are refused and a look is not, stop it."""
    write_config(tmp_path, store, target)
    source = start(started, tmp_path, POLL_SCRIPT)
    source.wait_for("source started")
    for flags in (("--set-position", "3"), ("--reset-positions",)):
        refused = run(tmp_path, POLL_SCRIPT, *flags)
        assert refused.returncode == EXIT_CONFIG, refused.stderr
        lines = refused.stderr.strip().splitlines()
        why = ("in use by a running connector", "a connector runs against it")
        assert len(lines) == 1 and any(text in lines[0] for text in why), lines
    assert isinstance(positions(tmp_path)["position"], int | None)  # a look is fine
    source.send(signal.SIGTERM)
    assert source.wait() == 0, source.stderr
    allowed = run(tmp_path, POLL_SCRIPT, "--set-position", "3")
    assert allowed.returncode == 0, allowed.stderr
    assert positions(tmp_path) == {"position": 3}


def test_changes_are_refused_while_the_source_runs_on_sqlite(
    tmp_path: Path, target: Target, started: list[Process]
) -> None:
    refused_while_running(tmp_path, started, "positions.db", target.url)
    # A source killed by SIGKILL holds nothing any more.
    killed = start(started, tmp_path, POLL_SCRIPT)
    killed.wait_for("source started")
    assert run(tmp_path, POLL_SCRIPT, "--reset-positions").returncode == EXIT_CONFIG
    killed.process.kill()
    killed.wait()
    assert run(tmp_path, POLL_SCRIPT, "--reset-positions").returncode == 0


def test_changes_are_refused_while_the_source_runs_on_etcd(
    tmp_path: Path, target: Target, started: list[Process], etcd_url: str
) -> None:
    refused_while_running(tmp_path, started, etcd_url, target.url)
