"""The connector-name rule and the e-mail check, and the hook that applies them.

This file is the one place those rules are written. It is read two ways:

- Imported as ``hooks.pre_gen_project`` (unrendered) by ``hooks/naming.py``, whose
  ``connector_name`` and ``author_email`` Jinja filters run while cookiecutter renders
  the answers, before any directory exists, and reject a bad value in one line.
- Rendered and run by cookiecutter as the ``pre_gen_project`` hook: the second line of
  defence, for contexts that skipped the filters (a hand-edited replay file, say).
  It runs as a copy in a temporary directory, so it imports nothing of the template.

The answers reach the hook as JSON text inside a raw string literal: Jinja's ``tojson``
escapes every quote, backslash and control character, so no answer can end the literal
or change this script, and the file is valid Python both before and after rendering.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping

NAME_PATTERN = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"
NAME_MAX_LENGTH = 63
NAME_RULE = (
    f"lower-case ASCII letters, digits and single dashes, starting with a letter, "
    f"not ending with a dash, at most {NAME_MAX_LENGTH} characters ({NAME_PATTERN})"
)
EMAIL_RULE = "an address like name@example.com (no spaces, one @, a dot in the domain)"

_NAME_RE = re.compile(NAME_PATTERN)
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")

#: The answers this hook checks, as one line of JSON once cookiecutter has rendered this
#: file; imported unrendered, it still holds the template expression (see main()).
#: Single quotes on purpose: ``tojson`` writes ``'`` as ``\u0027`` but keeps ``"``.
# fmt: off
ANSWERS_JSON = r'''{{ {
    "connector_name": cookiecutter.connector_name,
    "author_email": cookiecutter.author_email,
} | tojson }}'''
# fmt: on


def name_problem(value: object) -> str | None:
    """Return why ``value`` is not a valid connector name, or None when it is."""
    if not isinstance(value, str):
        return f"connector_name must be text, got {type(value).__name__}"
    # fullmatch: ``$`` alone would accept a trailing newline.
    if len(value) > NAME_MAX_LENGTH or not _NAME_RE.fullmatch(value):
        return f"connector_name {value!r} is invalid: use {NAME_RULE}"
    return None


def email_problem(value: object) -> str | None:
    """Return why ``value`` is not a plausible e-mail address, or None when it is."""
    if not isinstance(value, str) or not _EMAIL_RE.fullmatch(value):
        return f"author_email {value!r} is invalid: use {EMAIL_RULE}"
    return None


def problems(answers: Mapping[str, object]) -> list[str]:
    """One line per answer that breaks a rule."""
    found = [
        name_problem(answers.get("connector_name")),
        email_problem(answers.get("author_email")),
    ]
    return [problem for problem in found if problem]


def read_answers(text: str) -> dict[str, object] | None:
    """The answers in ``text``, or None when it is not a rendered JSON object."""
    try:
        answers = json.loads(text)
    except ValueError:  # still the template expression: this copy was never rendered
        return None
    return answers if isinstance(answers, dict) else None


def main() -> int:
    answers = read_answers(ANSWERS_JSON)
    if answers is None:
        found = ["pre_gen_project.py holds no answers: cookiecutter renders it before it runs"]
    else:
        found = problems(answers)
    for problem in found:
        print(f"Error: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
