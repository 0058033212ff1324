"""The answer rules (held by hooks/pre_gen_project.py) and the filters of hooks/naming.py."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from hooks import naming

GOOD_NAMES = ["a", "source-example", "sink-x1", "s3-bucket-sink", "a" * 63, "x-1-2-3"]
BAD_NAMES = ["", "A", "-a", "a-", "a--b", "1a", "a_b", "a b", "a" * 64, "é", "a\n", "a.b"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_pass(name: str) -> None:
    assert naming.name_problem(name) is None
    assert naming.check_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_with_the_value_and_the_rule(name: str) -> None:
    problem = naming.name_problem(name)
    assert problem is not None
    assert repr(name) in problem and naming.NAME_PATTERN in problem
    with pytest.raises(naming.AnswerError) as caught:
        naming.check_name(name)
    assert caught.value.format_message() == problem
    assert "\n" not in problem


def test_a_name_that_is_not_text_is_refused() -> None:
    assert naming.name_problem(42) == "connector_name must be text, got int"


@pytest.mark.parametrize("email", ["a@b.co", "first.last+tag@example.com", "x@mail.example.org"])
def test_plausible_emails_pass(email: str) -> None:
    assert naming.email_problem(email) is None


@pytest.mark.parametrize(
    "email", ["", "a", "a@b", "a@@b.co", "a b@c.de", "@b.co", "a@b.", "a@.b", "a@b.co\n"]
)
def test_implausible_emails_are_refused(email: str) -> None:
    problem = naming.email_problem(email)
    assert problem is not None and repr(email) in problem
    with pytest.raises(naming.AnswerError):
        naming.check_email(email)


@pytest.mark.parametrize(
    ("name", "camel"),
    [
        ("source-example", "Example"),
        ("sink-my-db", "MyDb"),
        ("source", "Source"),
        ("source-", "Source"),
        ("http-bridge", "HttpBridge"),
        ("sink-3d-printer", "Connector3dPrinter"),
    ],
)
def test_camel_case_drops_the_connector_type(name: str, camel: str) -> None:
    assert naming.camel_case(name) == camel
    assert naming.camel_case(name).isidentifier()


def test_snake_case() -> None:
    assert naming.snake_case("source-my-db") == "source_my_db"


HOSTILE = [
    'He said "hi"',
    "back\\slash \\n \\u0041",
    "new\nline\r\ttab",
    "ünïcødé 😀 €",
    "{{ cookiecutter.x }} {% raw %}",
    "'''\"\"\"",
    "\x00\x07\x1b\x7f\x85\u2028\ufeff",
    "key: value # not a comment",
    "- [a, b]",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_toml_string_round_trips(text: str) -> None:
    assert tomllib.loads(f"v = {naming.toml_string(text)}")["v"] == text


@pytest.mark.parametrize("text", HOSTILE)
def test_yaml_string_round_trips(text: str) -> None:
    assert yaml.safe_load(f"v: {naming.yaml_string(text)}")["v"] == text


# Encodable in UTF-8: any text but lone surrogates, which no answer can hold.
no_surrogates = st.text(st.characters(codec="utf-8"))


@given(no_surrogates)
def test_toml_string_round_trips_any_text(text: str) -> None:
    assert tomllib.loads(f"v = {naming.toml_string(text)}")["v"] == text


@given(no_surrogates)
def test_yaml_string_round_trips_any_text(text: str) -> None:
    assert yaml.safe_load(f"v: {naming.yaml_string(text)}")["v"] == text


def test_one_line_collapses_whitespace() -> None:
    assert naming.one_line(" a\n b\t\tc ") == "a b c"


def test_answers_json_keeps_public_answers_and_the_template_version() -> None:
    context = {
        "connector_name": "sink-x",
        "__class_prefix": "X",
        "_extensions": ["x"],
        "_template": "gh:o/r",
        "__template_version": "1.2.3",
    }
    assert json.loads(naming.answers_json(context)) == {
        "connector_name": "sink-x",
        "_template": "gh:o/r",
        "_template_version": "1.2.3",
    }


def test_the_extension_registers_its_filters() -> None:
    from jinja2 import Environment

    env = Environment(extensions=[naming.NameRuleExtension])
    assert env.from_string("{{ 'sink-my-db' | connector_name | camel_case }}").render() == "MyDb"
    with pytest.raises(naming.AnswerError):
        env.from_string("{{ 'Bad' | connector_name }}").render()
    assert env.from_string("{{ template_hooks_dir }}").render() == naming.HOOKS_DIR


def test_the_rules_come_from_pre_gen_project() -> None:
    from hooks import pre_gen_project

    for name in ("NAME_PATTERN", "NAME_MAX_LENGTH", "NAME_RULE", "EMAIL_RULE"):
        assert getattr(naming, name) == getattr(pre_gen_project, name)
    assert naming.name_problem is pre_gen_project.name_problem
    assert naming.email_problem is pre_gen_project.email_problem


def test_naming_imports_as_a_plain_module_from_the_hooks_dir(tmp_path: Path) -> None:
    """post_gen_project imports ``naming`` with only hooks/ on sys.path, not the template."""
    code = (
        f"import sys; sys.path.insert(0, {naming.HOOKS_DIR!r}); import naming; "
        "print(naming.name_problem.__module__, naming.check_name('a-b'))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-B", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "pre_gen_project a-b\n", "")
