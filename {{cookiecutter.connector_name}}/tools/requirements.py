"""What the image installs: pyproject.toml's dependencies, plus the extras named.

    python tools/requirements.py [EXTRA ...]    one requirement a line, on stdout

The Dockerfile runs it with its ``EXTRAS`` build argument and installs the result under
``constraints.txt``, the pinned versions (README.md, "Pinned versions", says how to
refresh them). Extras may be separated by spaces or commas; an unknown one is an error.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(extras: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        known = ", ".join(optional)
        raise SystemExit(f"unknown extra(s): {', '.join(unknown)} (pyproject.toml has {known})")
    return [*project["dependencies"], *(dep for extra in extras for dep in optional[extra])]


def main(argv: list[str]) -> int:
    extras = [extra for arg in argv for extra in arg.replace(",", " ").split()]
    print("\n".join(requirements(extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
