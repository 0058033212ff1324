"""Free-text answers are data: hostile ones still give valid Python, TOML, YAML and JSON."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import yaml
from template_support import render

OPEN, BLOCK = "{" + "{", "{" + "%"  # spelled apart: this file holds no template marker
# No carriage return: Jinja turns "\r\n" in an answer into "\n" before any file sees it.
DESCRIPTION = (
    'He said "hi" \\ back\\slash \\n\nsecond line\ttab\n'
    f"ünïcødé 😀 € \u2028 {OPEN} x }}}} {BLOCK} if y %}} ''' \"\"\" "
    "key: value # not a comment\n- [a, b]\n---\n"
)
AUTHOR = f'O\'Brien "Bob" \\ {OPEN} y }}}} Ünal'
EMAIL = 'o\'brien+"x"{z}@example.com'


def literal(text: str) -> str:
    """``text`` wrapped so that cookiecutter's rendering of answers keeps it as typed."""
    return f"{BLOCK} raw %}}{text}{BLOCK} endraw %}}"


@pytest.fixture(scope="module", params=["source-poll", "sink"])
def project(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    answers = {"connector_type": request.param.split("-")[0]}
    return render(
        tmp_path_factory.mktemp("hostile") / request.param,
        **answers,
        description=literal(DESCRIPTION),
        author_name=literal(AUTHOR),
        author_email=literal(EMAIL),
    )


def test_python_compiles(project: Path) -> None:
    for path in project.rglob("*.py"):
        compile(path.read_bytes(), str(path), "exec")


def test_toml_holds_the_answers_exactly(project: Path) -> None:
    meta = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert meta["description"] == DESCRIPTION
    assert meta["authors"] == [{"name": AUTHOR, "email": EMAIL}]


def test_yaml_holds_the_answers_exactly(project: Path) -> None:
    for path in project.rglob("*.y*ml"):
        if "cdk" not in path.relative_to(project).parts:
            assert list(yaml.safe_load_all(path.read_text(encoding="utf-8"))), path
    manifests = [project / "deploy" / "kubernetes" / "deployment.yaml"]
    if (project / "deploy" / "knative" / "service.yaml").exists():
        manifests.append(project / "deploy" / "knative" / "service.yaml")
    for manifest in manifests:
        loaded = yaml.safe_load(manifest.read_text(encoding="utf-8"))
        assert loaded["metadata"]["annotations"]["description"] == DESCRIPTION


def test_recorded_answers_hold_them_exactly(project: Path) -> None:
    answers = json.loads((project / ".cookiecutter.json").read_text(encoding="utf-8"))
    assert (answers["description"], answers["author_name"], answers["author_email"]) == (
        DESCRIPTION,
        AUTHOR,
        EMAIL,
    )


def test_prose_shows_them_on_one_line(project: Path) -> None:
    assert " ".join(AUTHOR.split()) in (project / "LICENSE").read_text(encoding="utf-8")
    assert " ".join(DESCRIPTION.split()) in (project / "README.md").read_text(encoding="utf-8")
