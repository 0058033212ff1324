"""The command line: flags, --help, --check-config, --about, --dry-run and --max-events."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from processes import (
    FLAGS,
    POLL_SCRIPT,
    SINK_SCRIPT,
    SOURCE_SCRIPT,
    Target,
    markers,
    run,
    sink_dir,
    source_dir,
)

import cdk
from cdk.config import ENVIRONMENT

# -- the command line -----------------------------------------------------------------


@pytest.mark.parametrize("script", [SINK_SCRIPT, SOURCE_SCRIPT], ids=["sink", "source"])
def test_help_lists_every_flag_and_environment_variable(tmp_path: Path, script: str) -> None:
    result = run(tmp_path, script, "--help")
    assert result.returncode == 0
    for flag in FLAGS:
        assert flag in result.stdout
    for name in (
        "CONNECTOR_CONFIG",
        "CONNECTOR_SECRET",
        "CONNECTOR_TARGET",
        "K_SINK",
        "CONNECTOR_PORT",
        "LOG_LEVEL",
        "K_CE_OVERRIDES",
    ):
        assert name in result.stdout
    assert "exit status" in result.stdout
    # The config keys, from the model's JSON schema (as --about and the README's table).
    assert "marker" in result.stdout and "grace_period" in result.stdout


def test_about_describes_the_connector_as_json(tmp_path: Path) -> None:
    result = run(tmp_path, SINK_SCRIPT, "--about")
    assert result.returncode == 0, result.stderr
    about = json.loads(result.stdout)
    assert about["kind"] == "sink" and about["name"] == "SyncSink"
    assert about["kit_version"] == cdk.__version__
    properties = about["config_schema"]["properties"]
    assert properties["api_key"]["writeOnly"] is True  # a secret
    assert "writeOnly" not in properties["note"]
    assert properties["port"]["default"] == 8080 and properties["port"]["description"]
    assert about["config_schema"]["required"] == ["marker"]
    names = [entry["name"] for entry in about["environment"]]
    assert names == [name for name, _, _ in ENVIRONMENT]


def test_dry_run_prints_events_without_a_target(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text("interval: 0\n")
    result = run(tmp_path, POLL_SCRIPT, "--dry-run", "--max-events", "3")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["id"] for e in events] == ["n1", "n2", "n3"]
    assert events[0]["data"] == {"n": 1} and events[0]["specversion"] == "1.0"
    assert "source started, target=stdout (dry run)" in result.stderr
    assert "--max-events reached" in result.stderr


def test_dry_run_reads_positions_and_never_writes_them(tmp_path: Path) -> None:
    """Issue 21.5: a dry run moved the stored position on, and the next real run skipped
    the events it had only printed."""
    (tmp_path / "config.yml").write_text("interval: 0\nposition_store: state/positions.db\n")
    first = run(tmp_path, POLL_SCRIPT, "--dry-run", "--max-events", "3")
    assert first.returncode == 0, first.stderr
    assert not (tmp_path / "state").exists()  # nothing stored, nothing created
    with cdk.PositionStore("Numbers", tmp_path / "state" / "positions.db") as store:
        store.set("position", 7)
    for _ in range(2):  # what a real run would send next, twice: the store is unchanged
        result = run(tmp_path, POLL_SCRIPT, "--dry-run", "--max-events", "3")
        assert result.returncode == 0, result.stderr
        assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [
            "n8",
            "n9",
            "n10",
        ]
    with cdk.PositionStore("Numbers", tmp_path / "state" / "positions.db") as store:
        assert store.get("position") == 7


def test_max_events_delivers_that_many_and_exits_0(tmp_path: Path, target: Target) -> None:
    (tmp_path / "config.yml").write_text(f"target: {target.url}\ninterval: 0\n")
    result = run(tmp_path, POLL_SCRIPT, "--max-events", "4")
    assert result.returncode == 0, result.stderr
    assert sorted(headers["ce-id"] for headers, _ in target.requests) == ["n1", "n2", "n3", "n4"]
    assert result.stdout == ""


def test_check_config_ok_starts_nothing(tmp_path: Path) -> None:
    sink_dir(tmp_path)
    result = run(tmp_path, SINK_SCRIPT, "--check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["config OK: config.yml"]
    assert markers(tmp_path) == []


def test_check_config_uses_config_flag(tmp_path: Path) -> None:
    sink_dir(tmp_path)
    (tmp_path / "config.yml").rename(tmp_path / "other.yml")
    result = run(tmp_path, SINK_SCRIPT, "--check-config", "--config", "other.yml")
    assert (result.returncode, result.stdout.strip()) == (0, "config OK: other.yml")


def test_check_config_bad_exits_2(tmp_path: Path) -> None:
    sink_dir(tmp_path, "port: 99999\n")
    result = run(tmp_path, SINK_SCRIPT, "--check-config")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "config: port: Input should be less than or equal to 65535"
    ]
    assert markers(tmp_path) == []


def test_bad_config_one_line_per_problem(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text("port: eighty\nlog_level: LOUD\nbogus: 1\n")
    result = run(tmp_path, SINK_SCRIPT)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    fields = sorted(line.split(":")[1].strip() for line in lines)
    assert fields == ["bogus", "log_level", "marker", "port"]
    assert "Traceback" not in result.stderr


def test_missing_config_and_bad_yaml_exit_2(tmp_path: Path) -> None:
    result = run(tmp_path, SINK_SCRIPT)
    assert (result.returncode, result.stderr.strip()) == (2, "config file not found: config.yml")
    (tmp_path / "config.yml").write_text("port: 1\n  marker: [\n")
    result = run(tmp_path, SINK_SCRIPT)
    assert result.returncode == 2
    assert re.fullmatch(r"config file config\.yml is not valid YAML at line 2.*\n", result.stderr)


def test_bad_k_ce_overrides_is_a_config_error(tmp_path: Path) -> None:
    source_dir(tmp_path, "http://127.0.0.1:9/")
    result = run(tmp_path, SOURCE_SCRIPT, K_CE_OVERRIDES="{not json")
    assert result.returncode == 2
    assert result.stderr.startswith("K_CE_OVERRIDES: not valid JSON")
    assert len(result.stderr.splitlines()) == 1
    result = run(tmp_path, SOURCE_SCRIPT, "--check-config", K_CE_OVERRIDES='{"extensions": [1]}')
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_bad_command_line_exits_2(tmp_path: Path) -> None:
    result = run(tmp_path, SINK_SCRIPT, "--log-format", "xml")
    assert result.returncode == 2
    assert "--log-format" in result.stderr


def test_unreadable_k_ca_certs_is_a_config_error(tmp_path: Path) -> None:
    source_dir(tmp_path, "https://127.0.0.1:9/")
    result = run(tmp_path, SOURCE_SCRIPT, "--check-config", K_CA_CERTS="not a certificate")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("K_CA_CERTS: not PEM certificates")
