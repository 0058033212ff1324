"""README.md's configuration table matches ``internal.config.Config``.

When this fails after a change to the config model, run ``python tools/config_table.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent


def test_readme_table_is_current() -> None:
    result = subprocess.run(
        [sys.executable, "tools/config_table.py", "--check"],
        cwd=PROJECT_DIR,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
