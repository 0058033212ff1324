"""Refuse a bad connector name or e-mail address before any file is written.

The same rules already ran while cookiecutter rendered the answers (the filters of
``hooks/naming.py``, which holds the rules). This hook catches contexts that skipped
that step, such as a hand-edited replay file. Answers arrive as JSON text, so no
answer can change this script.
"""

# The Jinja expressions below read as Python sets of undefined names until rendered.
# ruff: noqa: F821

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Mapping
from types import ModuleType

HOOKS_DIR: str = json.loads({{ template_hooks_dir | tojson | tojson }})
ANSWERS: dict[str, object] = {
    "connector_name": json.loads({{ cookiecutter.connector_name | tojson | tojson }}),
    "author_email": json.loads({{ cookiecutter.author_email | tojson | tojson }}),
}


def load_rules(hooks_dir: str) -> ModuleType:
    """Import ``naming`` from the template's hooks directory (this script runs as a copy)."""
    if hooks_dir not in sys.path:
        sys.path.insert(0, hooks_dir)
    return importlib.import_module("naming")


def problems(answers: Mapping[str, object], rules: ModuleType) -> list[str]:
    """One line per answer that breaks a rule."""
    found = [
        rules.name_problem(answers.get("connector_name")),
        rules.email_problem(answers.get("author_email")),
    ]
    return [problem for problem in found if problem]


def main() -> int:
    found = problems(ANSWERS, load_rules(HOOKS_DIR))
    for problem in found:
        print(f"Error: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
