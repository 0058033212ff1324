"""Keep README.md's configuration table in step with ``internal.config.Config``.

``python tools/config_table.py`` rewrites the table between the two markers in
README.md; ``python tools/config_table.py --check`` exits 1 when the table is stale
(the tests run that check, so a new config field cannot go undocumented).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

PROJECT_DIR = Path(__file__).resolve().parent.parent
BEGIN = "<!-- config-table:begin (made by tools/config_table.py; do not edit by hand) -->"
END = "<!-- config-table:end -->"


#: Names a config.yml author knows, for the types config models use.
TYPE_NAMES = {
    "str": "string",
    "SecretStr": "string (secret)",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
}


def type_name(annotation: Any) -> str:
    """A short, readable name for a field's type (``X | None`` reads as ``X``)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return " or ".join(type_name(arg) for arg in args)
    name = getattr(annotation, "__name__", str(annotation))
    return TYPE_NAMES.get(name, name)


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    # A default_factory (``Field(default_factory=list)``) counts as a default too.
    default = field.get_default(call_default_factory=True)
    if default is None:
        return "unset"
    return f"`{default}`"


def config_table(model: type[BaseModel]) -> str:
    """The Markdown table of ``model``'s keys, one row per field."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| `{name}` | {type_name(field.annotation)} | "
            f"{default_text(field)} | {description} |"
        )
    return "\n".join(rows)


def with_table(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``."""
    start = readme.index(BEGIN) + len(BEGIN)
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
    updated = with_table(readme, config_table(Config))
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
