"""The command line: flags, --help, --check-config, --about, --dry-run and --max-events."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from processes import (
    FLAGS,
    SINK_SCRIPT,
    SOURCE_SCRIPT,
    markers,
    run,
    sink_dir,
    source_dir,
)

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
