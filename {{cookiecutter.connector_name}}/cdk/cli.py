"""The command line of ``cmd/main.py``: flags, ``--help``, ``--about`` and the exit statuses.

``--help``, ``--about`` and the generated README's configuration table all describe the
config model from its JSON schema, and the environment from ``cdk.config.ENVIRONMENT``.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import tomllib
from collections.abc import Sequence
from functools import cache, partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cdk.config import ENVIRONMENT
from cdk.logs import LEVELS

__all__ = [
    "ALL_PARTITIONS",
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "SHUTDOWN_ALLOWANCE",
    "about",
    "build_parser",
    "project_metadata",
    "settings",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

#: Seconds a signalled stop may run past the grace period (for ``destroy``) before the
#: process stops at once with status 1: a hung ``destroy`` must not keep a pod alive forever.
SHUTDOWN_ALLOWANCE = 10.0

_EXIT_HELP = (
    (
        EXIT_OK,
        "clean stop: after SIGTERM/SIGINT, or the source finished (--max-events, the"
        " producer returned) and everything was settled; --check-config/--about succeeded",
    ),
    (
        EXIT_FAILURE,
        "runtime failure: initialize/loop_produce_event/destroy raised, an event a"
        " checkpoint tracks failed for good, the port cannot be bound, a second signal forced"
        f" the stop, or a stop overran grace_period + {SHUTDOWN_ALLOWANCE:g} s",
    ),
    (
        EXIT_CONFIG,
        "bad configuration or command line: one line per problem on stderr; a position"
        " change refused (the connector runs against the same store)",
    ),
)
#: ``--reset-positions`` without a PARTITION.
ALL_PARTITIONS = "\0all"
_WIDTH = 92
#: Where the project's pyproject.toml is: the directory above the vendored kit.
_PROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@cache
def project_metadata() -> dict[str, str]:
    """The connector's ``name`` and ``version`` from its pyproject.toml, when it has one."""
    try:
        project = tomllib.loads(_PROJECT.read_text(encoding="utf-8")).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return {key: str(project[key]) for key in ("name", "version") if key in project}


def config_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema, each secret field marked ``writeOnly`` at its own level."""
    schema = model.model_json_schema()
    for prop in schema.get("properties", {}).values():
        if any(branch.get("writeOnly") for branch in prop.get("anyOf", ())):
            prop["writeOnly"] = True
    return schema


def _type_name(prop: dict[str, Any]) -> str:
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    names = []
    for branch in branches:
        if "enum" in branch:
            names.append(" | ".join(f"`{value}`" for value in branch["enum"]))
        elif branch.get("writeOnly"):
            names.append("string (secret)")
        else:
            names.append(branch.get("type") or branch.get("$ref", "object").rsplit("/", 1)[-1])
    return " or ".join(names) or "any"


def settings(model: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """One ``(key, type, default, description)`` per field, from the model's JSON schema."""
    schema = config_schema(model)
    required = set(schema.get("required", ()))
    rows = []
    for key, prop in schema.get("properties", {}).items():
        if key in required:
            default = "required"
        elif prop.get("default") is None:
            default = "unset"
        else:
            default = f"`{prop['default']}`"
        rows.append((key, _type_name(prop), default, " ".join(prop.get("description", "").split())))
    return rows


def about(config_cls: type[BaseModel], kind: str, connector: str) -> dict[str, Any]:
    """The connector's self-description, printed by ``--about``."""
    import cdk

    meta = project_metadata()
    return {
        "name": meta.get("name", connector),
        "kind": kind,
        "version": meta.get("version", "unknown"),
        "kit_version": cdk.__version__,
        "config_schema": config_schema(config_cls),
        "environment": [
            {"name": name, "key": key, "description": text} for name, key, text in ENVIRONMENT
        ],
    }


def _entries(rows: Sequence[tuple[object, str]]) -> list[str]:
    width = max(len(str(key)) for key, _ in rows)
    return [
        textwrap.fill(
            text,
            _WIDTH,
            initial_indent=f"  {str(key).ljust(width)}  ",
            subsequent_indent=" " * (width + 4),
        )
        for key, text in rows
    ]


def _epilog(config_cls: type[BaseModel]) -> str:
    keys = [(key, f"{kind}, {default}: {doc}") for key, kind, default, doc in settings(config_cls)]
    env = [(name, text) for name, _, text in ENVIRONMENT]
    sections = (
        ("configuration keys (config.yml, secret.yml):", keys),
        ("environment variables:", env),
        ("exit status:", _EXIT_HELP),
    )
    return "\n\n".join("\n".join([title, *_entries(rows)]) for title, rows in sections)


def _prog() -> str:
    script = sys.argv[0] if sys.argv and sys.argv[0] else "cmd/main.py"
    return f"python {script}" if script.endswith(".py") else os.path.basename(script)


def build_parser(kind: str, name: str, config_cls: type[BaseModel]) -> argparse.ArgumentParser:
    """The ``cmd/main.py`` command line of a ``kind`` ("source" or "sink") connector."""
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description=f"Run the {name} CloudEvents {kind} connector until SIGTERM or SIGINT.",
        epilog=_epilog(config_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    flag = partial(add, action="store_true")
    add("--config", metavar="FILE", help="config file (default: $CONNECTOR_CONFIG or ./config.yml)")
    add(
        "--secret",
        metavar="FILE",
        help="secret file merged over the config"
        " (default: $CONNECTOR_SECRET, else ./secret.yml, each when it exists)",
    )
    flag(
        "--check-config",
        help='validate the configuration, print "config OK: FILE" and exit 0,'
        " or print each problem and exit 2",
    )
    flag("--about", help="print name, kind, versions, config schema and environment as JSON")
    add(
        "--log-level", type=str.upper, choices=LEVELS, metavar="LEVEL", help="overrides `log_level`"
    )
    add("--log-format", choices=("text", "json"), help="text lines, or one JSON object per line")
    if kind == "source":
        flag("--dry-run", help="print each event on stdout as a structured JSON line; send nothing")
        add("--max-events", type=int, metavar="N", help="stop after N events (then exit 0)")
        flag("--positions", help="print the stored positions as one JSON object, then exit 0")
        add(
            "--set-position",
            metavar="[PARTITION=]VALUE",
            help="store VALUE (JSON, else a string) as the position (of PARTITION), then exit 0;"
            " refused (exit 2) while the connector runs against the same store",
        )
        add(
            "--reset-positions",
            nargs="?",
            const=ALL_PARTITIONS,
            metavar="PARTITION",
            help="forget the stored position(s) (of PARTITION only, if given), then exit 0;"
            " refused (exit 2) while the connector runs against the same store",
        )
    return parser
