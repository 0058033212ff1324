"""The Jinja filters that check answers and embed them safely.

``NameRuleExtension``, listed in ``cookiecutter.json`` under ``_extensions``, adds them
to the template's Jinja. Its ``connector_name`` and ``author_email`` filters run while
the answers are rendered, before cookiecutter creates any directory, and reject a bad
value with :class:`AnswerError`, which the cookiecutter CLI prints as one ``Error: ...``
line. The rules themselves live in ``hooks/pre_gen_project.py`` (the contract's place
for them), which also applies them again as the ``pre_gen_project`` hook; this module
imports them from there.

The other filters turn free text into literals of the target format, so an answer
with quotes, backslashes, newlines, unicode or template markers stays data. The
extension also turns a template error in an answer given on the command line into one
``AnswerError`` line (see :func:`guard_rendering`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from jinja2 import Environment, Template, TemplateSyntaxError, UndefinedError
from jinja2.ext import Extension

# The rules live in pre_gen_project.py; its module name follows how this one was loaded.
if TYPE_CHECKING:  # mypy reads hooks/*.py as top-level modules (hooks/ is no package)
    import pre_gen_project as _rules
else:
    try:  # cookiecutter's ``_extensions``: hooks.naming, with the template dir on sys.path
        from hooks import pre_gen_project as _rules
    except ModuleNotFoundError:  # post_gen_project: plain naming, with hooks/ on sys.path
        import pre_gen_project as _rules

EMAIL_RULE = _rules.EMAIL_RULE
NAME_MAX_LENGTH = _rules.NAME_MAX_LENGTH
NAME_PATTERN = _rules.NAME_PATTERN
NAME_RULE = _rules.NAME_RULE
email_problem = _rules.email_problem
name_problem = _rules.name_problem

__all__ = [  # the rules are re-exported: callers may take everything from here
    "EMAIL_RULE",
    "HOOKS_DIR",
    "NAME_MAX_LENGTH",
    "NAME_PATTERN",
    "NAME_RULE",
    "AnswerError",
    "NameRuleExtension",
    "answers_json",
    "camel_case",
    "check_email",
    "check_name",
    "email_problem",
    "guard_rendering",
    "name_problem",
    "one_line",
    "snake_case",
    "toml_string",
    "yaml_string",
]

#: Where ``post_gen_project`` finds this module: the hook scripts run as copies in a
#: temporary directory.
HOOKS_DIR = str(Path(__file__).resolve().parent)


class AnswerError(click.ClickException):
    """An answer breaks a rule; the CLI prints ``Error: <message>`` and exits 1."""


def check_name(value: str) -> str:
    """Jinja filter: ``value`` unchanged when valid, else raise :class:`AnswerError`."""
    problem = name_problem(value)
    if problem:
        raise AnswerError(problem)
    return value


def check_email(value: str) -> str:
    """Jinja filter: ``value`` unchanged when plausible, else raise :class:`AnswerError`."""
    problem = email_problem(value)
    if problem:
        raise AnswerError(problem)
    return value


def camel_case(name: str) -> str:
    """``source-my-db`` -> ``MyDb``: the class-name prefix, without the connector type."""
    for prefix in ("source-", "sink-"):
        if name.startswith(prefix) and len(name) > len(prefix):
            name = name[len(prefix) :]
            break
    words = [word for word in name.split("-") if word]
    camel = "".join(word[:1].upper() + word[1:] for word in words)
    # A class name cannot start with a digit; the name rule only guarantees the first word.
    return camel if camel[:1].isalpha() else "Connector" + camel


def snake_case(name: str) -> str:
    """``source-my-db`` -> ``source_my_db``: a Python identifier."""
    return name.replace("-", "_")


def _escape_outside(text: str, allowed: re.Pattern[str]) -> str:
    out = []
    for char in text:
        if allowed.match(char):
            out.append(char)
        elif "\ud800" <= char <= "\udfff":
            # A lone surrogate (undecodable input) has no escape in TOML; keep a marker.
            out.append("\\ufffd")
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return "".join(out)


# Characters a TOML basic string or a YAML double-quoted scalar may hold unescaped.
_TOML_PLAIN = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]")
# YAML 1.1 reads U+0085, U+2028 and U+2029 as line breaks, and U+FEFF as a byte-order
# mark, so those are escaped too.
_YAML_PLAIN = re.compile(
    r"[\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]"
)


def toml_string(value: object) -> str:
    """A TOML basic string holding ``value`` exactly."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return '"' + _escape_outside(text, _TOML_PLAIN) + '"'


def yaml_string(value: object) -> str:
    """A YAML double-quoted scalar holding ``value`` exactly."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return '"' + _escape_outside(text, _YAML_PLAIN) + '"'


def one_line(value: object) -> str:
    """Free text for prose (Markdown, a license line): whitespace runs become one space."""
    return " ".join(str(value).split())


def answers_json(cookiecutter: Mapping[str, Any]) -> str:
    """The answers as a JSON object (what ``cruft link --extra-context`` takes),
    plus where the template came from and its version."""
    answers: dict[str, Any] = {
        key: value for key, value in cookiecutter.items() if not key.startswith("_")
    }
    answers["_template"] = cookiecutter.get("_template")
    answers["_template_version"] = cookiecutter.get("__template_version")
    return json.dumps(answers, indent=2, ensure_ascii=True)


def _unrenderable(source: str, error: Exception) -> str:
    shown = source if len(source) <= 80 else source[:77] + "..."
    message = getattr(error, "message", None) or str(error)
    return (
        f"cannot render {shown!r}: {message} (answers are read as Jinja templates; "
        f"a connector_name must use {NAME_RULE})"
    )


def guard_rendering(environment: Environment) -> None:
    """Make a template error in a rendered string end as one :class:`AnswerError` line.

    cookiecutter renders answers given on its command line (``connector_name=...``)
    as templates before any check sees them; one with broken or undefined template
    syntax would otherwise end in a traceback or a dump of the whole context.
    """
    original = environment.from_string

    def from_string(
        source: str | Any,
        globals: MutableMapping[str, Any] | None = None,
        template_class: type[Template] | None = None,
    ) -> Template:
        try:
            template = original(source, globals, template_class)
        except TemplateSyntaxError as exc:
            raise AnswerError(_unrenderable(str(source), exc)) from None
        render = template.render

        def guarded_render(*args: Any, **kwargs: Any) -> str:
            try:
                return render(*args, **kwargs)
            except UndefinedError as exc:
                raise AnswerError(_unrenderable(str(source), exc)) from None

        template.render = guarded_render  # type: ignore[method-assign]
        return template

    environment.from_string = from_string  # type: ignore[method-assign]


class NameRuleExtension(Extension):
    """Adds the answer checks and the safe-embedding filters to the template's Jinja."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        guard_rendering(environment)
        environment.filters.update(
            {
                "connector_name": check_name,
                "author_email": check_email,
                "camel_case": camel_case,
                "snake_case": snake_case,
                "toml_string": toml_string,
                "yaml_string": yaml_string,
                "one_line": one_line,
                "answers_json": answers_json,
            }
        )
        environment.globals["template_hooks_dir"] = HOOKS_DIR
