"""The template's own code (hooks and tests) passes the lint it asks of generated projects.

The generated project's code, the vendored cdk included, is linted and type-checked
in tests/template/ after rendering, with the project's own settings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_hooks_and_tests_pass_ruff() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--no-cache",
            "--config",
            "tests/ruff.toml",
            "hooks",
            "tests",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
