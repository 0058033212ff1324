"""Keep README.md's configuration table in step with ``internal.config.Config``.

``python tools/config_table.py`` rewrites the table between the two markers in
README.md; ``python tools/config_table.py --check`` exits 1 when the table is stale
(the tests run that check, so a new config field cannot go undocumented).

The table is made from the model's JSON schema (``Config.model_json_schema()``, what
``python cmd/main.py --about`` prints), so :func:`table_from_schema` needs nothing
beyond the standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
BEGIN = "<!-- config-table:begin (made by tools/config_table.py; do not edit by hand) -->"
END = "<!-- config-table:end -->"

#: Names a config.yml author knows, for the JSON schema's types.
TYPE_NAMES = {"array": "list", "object": "mapping"}


def type_name(schema: Mapping[str, Any]) -> str:
    """A short, readable name for a property's type (``X | None`` reads as ``X``)."""
    if "anyOf" in schema:
        options = [option for option in schema["anyOf"] if option.get("type") != "null"]
        return " or ".join(type_name(option) for option in options)
    if "enum" in schema:
        return " \\| ".join(f"`{value}`" for value in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    if schema.get("format") == "password":  # SecretStr
        return "string (secret)"
    kind = str(schema.get("type", "mapping" if "$ref" in schema else "any"))
    return TYPE_NAMES.get(kind, kind)


def default_text(schema: Mapping[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" not in schema:
        return "computed"  # a default_factory: the schema cannot show its value
    default = schema["default"]
    if default is None:
        return "unset"
    return f"`{default if isinstance(default, str) else json.dumps(default)}`"


def table_from_schema(schema: Mapping[str, Any]) -> str:
    """The Markdown table of a config model's JSON schema, one row per key."""
    required = set(schema.get("required", ()))
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, prop in schema.get("properties", {}).items():
        description = str(prop.get("description", "")).replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| `{name}` | {type_name(prop)} | "
            f"{default_text(prop, name in required)} | {description} |"
        )
    return "\n".join(rows)


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
    if str(PROJECT_DIR) not in sys.path:
        sys.path.insert(0, str(PROJECT_DIR))
    from internal.config import Config

    readme_path = PROJECT_DIR / "README.md"
    readme = readme_path.read_text(encoding="utf-8")
    updated = with_table(readme, table_from_schema(Config.model_json_schema()))
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
