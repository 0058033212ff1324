"""The generated tests never touch the project's own state, whatever config.yml says.

The README recommends ``position_store: positions.db`` in config.yml; the contract
suites read config.yml, so they must still give every run a fresh store, or they would
move the project's real positions (and a later run would start at their end).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml
from template_support import run_in


def test_generated_tests_leave_the_projects_positions_alone(
    rendered: dict[str, Path], tmp_path: Path
) -> None:
    project = tmp_path / "project"
    shutil.copytree(rendered["source-poll"], project)
    config_path = project / "config.yml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    config_path.write_text(yaml.safe_dump({**config, "position_store": "positions.db"}))
    for run in (1, 2):  # a second run would start where the first left the store
        result = run_in(
            project, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", timeout=600
        )
        assert result.returncode == 0, f"run {run}:\n{result.stdout[-4000:]}{result.stderr}"
        assert not (project / "positions.db").exists(), "the tests wrote the project's store"
