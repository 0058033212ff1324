"""Keep README.md's configuration table in step with ``internal.config.Config``.

``python tools/config_table.py`` rewrites the table between the two markers in
README.md; ``python tools/config_table.py --check`` exits 1 when the table is stale
(the tests run that check, so a new config field cannot go undocumented).

The rows are the kit's ``cdk.cli.settings``: the model's JSON schema, as ``--help``
and ``--about`` show it. This file only lays them out in Markdown, and imports the
kit only in :func:`model_table`, so the rest needs nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
BEGIN = "<!-- config-table:begin (made by tools/config_table.py; do not edit by hand) -->"
END = "<!-- config-table:end -->"


def markdown_table(rows: Iterable[tuple[str, str, str, str]]) -> str:
    """A Markdown table of ``(key, type, default, description)`` rows."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, kind, default, description in rows:
        cells = [f"`{key}`", kind, default, description]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def model_table() -> str:
    """The table of ``internal.config.Config``."""
    if str(PROJECT_DIR) not in sys.path:
        sys.path.insert(0, str(PROJECT_DIR))
    from cdk.cli import settings
    from internal.config import Config

    return markdown_table(settings(Config))


def with_table(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``."""
    # The last marker: the description at the top is the user's text, not the table.
    start = readme.rindex(BEGIN) + len(BEGIN)
    end = readme.index(END, start)
    return readme[:start] + "\n" + table + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when README.md is stale")
    args = parser.parse_args(argv)
    readme_path = PROJECT_DIR / "README.md"
    readme = readme_path.read_text(encoding="utf-8")
    updated = with_table(readme, model_table())
    if updated == readme:
        return 0
    if args.check:
        print(
            "README.md's configuration table is stale: run python tools/config_table.py",
            file=sys.stderr,
        )
        return 1
    readme_path.write_text(updated, encoding="utf-8")
    print("README.md: configuration table updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
