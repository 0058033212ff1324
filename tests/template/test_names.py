"""Connector names: bad ones are refused cleanly, before anything is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from template_support import REPO, clean_env, render, write_user_config

from hooks.naming import NAME_PATTERN, AnswerError

OPEN, BLOCK = "{" + "{", "{" + "%"  # spelled apart: this file holds no template marker

HOSTILE_NAMES = [
    "Source-Example",  # upper case
    "source_example",  # underscore
    "source example",  # space
    "1source",  # leading digit
    "-source",  # leading dash
    "source-",  # trailing dash
    "source--example",  # double dash
    "a" * 64,  # one too long
    "sóurce",  # non-ASCII letter
    "ｓource",  # full-width letter  # noqa: RUF001
    "source😀",  # emoji
    "source/example",  # path separator
    "../source",  # parent directory
    "..",  # parent directory alone
    "source\\example",  # backslash
    "$(touch pwned)",  # command substitution
    "source;rm -rf x",  # command separator
    "`id`",  # backticks
    "source|cat",  # pipe
    "source.example",  # dot
    "",  # empty
    "source\nexample",  # newline
    "source\texample",  # tab
    " source",  # leading space
    f"{OPEN} 'Sink' }}}}",  # template expression (renders to an upper-case name)
    f"{OPEN} undefined_name }}}}",  # template expression naming nothing
    f"{BLOCK} if %}}",  # broken template statement
    f"{OPEN}",  # unterminated template expression
]
TEMPLATED = {name for name in HOSTILE_NAMES if OPEN in name or BLOCK in name}


def run_cli(output_dir: Path, *answers: str) -> subprocess.CompletedProcess[str]:
    config = write_user_config(output_dir.parent / f".cc-{output_dir.name}")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cookiecutter",
            "--no-input",
            "--config-file",
            str(config),
            "--output-dir",
            str(output_dir),
            str(REPO),
            *answers,
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
        env=clean_env(),
    )


def test_there_are_enough_hostile_names() -> None:
    assert len(set(HOSTILE_NAMES)) >= 20


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_cli_refuses_a_hostile_name_in_one_line(tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(out, f"connector_name={name}")
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0, output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("Error: ") and NAME_PATTERN in output, output
    assert "Traceback" not in output
    if name not in TEMPLATED:
        assert repr(name) in output, output
    assert list(out.iterdir()) == []


def test_cli_refuses_an_implausible_email_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(out, "author_email=not an address")
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0
    assert output.splitlines() == [output]
    assert "author_email 'not an address' is invalid" in output
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("name", ["Bad_Name", "a--b", f"{OPEN} nope }}}}"])
def test_python_api_raises_one_line_and_writes_nothing(tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(AnswerError) as caught:
        render(out, connector_name=name)
    assert "\n" not in caught.value.format_message()
    assert NAME_PATTERN in caught.value.format_message()
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("name", ["a", "sink-x9", "s" * 63, "source-my-db-2"])
def test_cli_accepts_good_names(tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(out, f"connector_name={name}", "connector_type=sink")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [p.name for p in out.iterdir()] == [name]
