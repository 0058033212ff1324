"""Every supported combination renders to exactly its files, valid and lint-clean."""

from __future__ import annotations

import json
import re
import shutil
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from template_support import (
    CONFIG_TABLES,
    LICENSES,
    README_TEMPLATE,
    REPO,
    TEMPLATE_PROJECT,
    VARIANT_LICENSE,
    VARIANTS,
    expected_files,
    files_under,
    render,
    run_in,
    tool,
)

MARKER = re.compile(r"\{\{|\{%")
TEST_EXTRAS = {"pytest", "pytest-timeout", "ruff", "mypy", "types-pyyaml"}


def runtime_requirements() -> list[Requirement]:
    """The generated project's runtime part of tests/requirements.txt (its first block)."""
    lines = (REPO / "tests" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if "runtime dependencies" in line) + 1
    block = []
    for line in lines[start:]:
        if line.startswith("#"):
            break
        if line.strip():
            block.append(Requirement(line))
    return block


@pytest.mark.parametrize("variant", VARIANTS)
def test_exactly_the_expected_files(rendered: dict[str, Path], variant: str) -> None:
    project = rendered[variant]
    expected = expected_files(variant)
    actual = {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()}
    assert sorted(actual - expected) == [], "unexpected files"
    assert sorted(expected - actual) == [], "missing files"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_kit_is_copied_verbatim(rendered: dict[str, Path], variant: str) -> None:
    for relative in files_under(TEMPLATE_PROJECT / "cdk"):
        original = (TEMPLATE_PROJECT / "cdk" / relative).read_bytes()
        assert (rendered[variant] / "cdk" / relative).read_bytes() == original, relative


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_template_marker_left_and_all_python_compiles(
    rendered: dict[str, Path], variant: str
) -> None:
    project = rendered[variant]
    for path in project.rglob("*"):
        relative = path.relative_to(project)
        if not path.is_file() or relative.parts[0] == "cdk":
            continue
        text = path.read_text(encoding="utf-8")
        assert not MARKER.search(text), f"{relative}: {MARKER.search(text)}"
        if path.suffix == ".py":
            compile(text, str(path), "exec")


@pytest.mark.parametrize("variant", VARIANTS)
def test_pyproject_declares_the_runtime_dependencies_of_the_kit(
    rendered: dict[str, Path], variant: str
) -> None:
    pyproject = tomllib.loads((rendered[variant] / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    assert [str(r) for r in declared] == [str(r) for r in runtime_requirements()]
    assert {Requirement(r).name for r in project["optional-dependencies"]["test"]} >= TEST_EXTRAS
    assert project["name"] == rendered[variant].name
    assert project["license"] == VARIANT_LICENSE[variant]
    assert pyproject["tool"]["ruff"]["line-length"] == 100


@pytest.mark.parametrize("variant", VARIANTS)
def test_entry_point_runs_the_right_connector(rendered: dict[str, Path], variant: str) -> None:
    main = (rendered[variant] / "cmd" / "main.py").read_text(encoding="utf-8")
    if variant == "sink":
        assert "cdk.run_sink(Config, ExampleSink)" in main
    else:
        assert "cdk.run_source(Config, ExampleSource)" in main
    assert not (rendered[variant] / "cmd" / "__init__.py").exists()


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_model_extends_the_right_base(rendered: dict[str, Path], variant: str) -> None:
    text = (rendered[variant] / "internal" / "config.py").read_text(encoding="utf-8")
    base = {"sink": "SinkConfig", "source-poll": "SourceConfig"}.get(variant, "WebhookSourceConfig")
    assert f"class Config(cdk.{base}):" in text
    assert "password: SecretStr | None" in text and "secret: SecretStr | None" in text


@pytest.mark.parametrize("variant", VARIANTS)
def test_readme_table_matches_the_config_model(rendered: dict[str, Path], variant: str) -> None:
    project = rendered[variant]
    check = run_in(project, sys.executable, "tools/config_table.py", "--check", timeout=60)
    assert check.returncode == 0, check.stderr + "\nrun: python tests/template/template_support.py"
    assert (CONFIG_TABLES / f"{variant}.md").read_text(encoding="utf-8") in (
        project / "README.md"
    ).read_text(encoding="utf-8")


def test_the_readme_template_keeps_no_table() -> None:
    """The table is written at render time from the model's schema, in one place."""
    text = README_TEMPLATE.read_text(encoding="utf-8")
    region = text[text.index("<!-- config-table:begin") : text.index("<!-- config-table:end")]
    assert region.count("\n") == 1, "the README template holds a table: keep only the markers"
    assert "| key |" not in text


def test_readme_table_shows_each_kind_of_default(rendered: dict[str, Path]) -> None:
    project = rendered["source-poll"]
    code = (
        "import sys; sys.path[:0] = ['.', 'tools']; import config_table\n"
        "from typing import Literal\n"
        "from pydantic import BaseModel, Field, SecretStr\n"
        "from cdk.cli import settings\n"
        "class M(BaseModel):\n"
        "    need: str\n"
        "    opt: int | None = None\n"
        "    key: SecretStr | None = Field(None, description='a | b')\n"
        "    mode: Literal['a', 'b'] = 'a'\n"
        "print(config_table.markdown_table(settings(M)))"
    )
    result = run_in(project, sys.executable, "-c", code, check=True)
    rows = result.stdout.splitlines()[2:]
    assert rows == [
        "| `need` | string | required |  |",
        "| `opt` | integer | unset |  |",
        "| `key` | string (secret) | unset | a \\| b |",
        "| `mode` | `a` \\| `b` | `a` |  |",
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_recorded_answers(rendered: dict[str, Path], variant: str) -> None:
    answers = json.loads((rendered[variant] / ".cookiecutter.json").read_text(encoding="utf-8"))
    assert answers["connector_type"] == VARIANTS[variant]["connector_type"]
    assert answers["license"] == VARIANT_LICENSE[variant]
    assert answers["_template_version"]
    assert not any(key.startswith("__") for key in answers)


@pytest.mark.parametrize("license_id", LICENSES)
def test_each_license(tmp_path: Path, license_id: str) -> None:
    project = render(tmp_path / "out", license=license_id, author_name="Ada Lovelace")
    text = (project / "LICENSE").read_text(encoding="utf-8")
    first_words = {
        "Apache-2.0": "Apache License",
        "MIT": "MIT License",
        "BSD-3-Clause": "BSD 3-Clause License",
        "Proprietary": "All rights reserved.",
    }[license_id]
    assert first_words in text
    assert re.search(r"Copyright (\(c\) )?\d{4},? Ada Lovelace", text)
    assert "[yyyy]" not in text
    if license_id == "Apache-2.0":
        assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 190
    pyproject = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    expected = "LicenseRef-Proprietary" if license_id == "Proprietary" else license_id
    assert pyproject["project"]["license"] == expected


def test_sink_ignores_source_style(tmp_path: Path) -> None:
    project = render(tmp_path / "out", connector_type="sink", source_style="webhook")
    assert (project / "internal" / "sink.py").exists()
    assert not (project / "internal" / "source.py").exists()


def test_class_names_follow_the_connector_name(tmp_path: Path) -> None:
    project = render(tmp_path / "out", connector_type="sink", connector_name="sink-my-db")
    assert "class MyDbSink(cdk.Sink[Config]):" in (project / "internal" / "sink.py").read_text()
    assert "cdk.run_sink(Config, MyDbSink)" in (project / "cmd" / "main.py").read_text()


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_yaml_file_parses(rendered: dict[str, Path], variant: str) -> None:
    for path in rendered[variant].rglob("*.y*ml"):
        if "cdk" not in path.relative_to(rendered[variant]).parts:
            assert list(yaml.safe_load_all(path.read_text(encoding="utf-8"))), path


@pytest.mark.parametrize("variant", VARIANTS)
def test_ruff_is_clean(rendered: dict[str, Path], variant: str) -> None:
    result = run_in(rendered[variant], tool("ruff"), "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_mypy_is_clean(rendered: dict[str, Path], variant: str, tmp_path: Path) -> None:
    result = run_in(
        rendered[variant],
        sys.executable,
        "-m",
        "mypy",
        "--cache-dir",
        str(tmp_path / "mypy"),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cmd/main.py" in result.stdout or "Success" in result.stdout


@pytest.mark.parametrize("connector_type", ["source", "sink"])
def test_the_longest_name_is_still_lint_clean(tmp_path: Path, connector_type: str) -> None:
    name = "-".join(["a" * 31, "b" * 31])  # 63 characters, the most the rule allows
    project = render(tmp_path / "out", connector_type=connector_type, connector_name=name)
    result = run_in(project, tool("ruff"), "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_what_to_edit_names_every_file_a_user_changes(
    rendered: dict[str, Path], variant: str
) -> None:
    readme = (rendered[variant] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## What to edit") : readme.index("## Configuration")]
    named = {name for row in re.findall(r"^\| (.+?) \|", section, re.M) for name in row.split(", ")}
    code = "`internal/sink.py`" if variant == "sink" else "`internal/source.py`"
    wanted = {"`internal/config.py`", code, "`config.yml`", "`pyproject.toml`", "`tests/`"}
    assert wanted | {"`deploy/`"} <= named


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_settings_form_test_docstrings_show_passes_lint_and_types(
    rendered: dict[str, Path], variant: str, tmp_path: Path
) -> None:
    """Pasted into the test class as the docstring says, the example is ruff and mypy clean."""
    project = tmp_path / variant
    shutil.copytree(rendered[variant], project)
    (suite,) = [p for p in (project / "tests").glob("test_*.py") if "Tests):" in p.read_text()]
    text = suite.read_text(encoding="utf-8")
    example = text[text.index("::\n\n") + 3 : text.index('"""', text.index("::\n\n"))]
    lines = textwrap.dedent(example).strip().splitlines()
    imports = [line for line in lines if line.startswith(("from ", "import "))]
    body = [line for line in lines if line and line not in imports]
    assert body, f"{suite.name}: the docstring shows no setting"
    head, _, rest = text.partition("from __future__ import annotations\n")
    pasted = head + "from __future__ import annotations\n\n" + "\n".join(imports) + rest
    pasted = pasted.rstrip("\n") + "\n" + "".join(f"    {line}\n" for line in body)
    suite.write_text(pasted, encoding="utf-8")
    ruff = run_in(project, tool("ruff"), "check", "--no-cache", "--fix", ".")
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr
    assert body[0] in suite.read_text(encoding="utf-8")
    mypy = run_in(
        project, sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy"), timeout=300
    )
    assert mypy.returncode == 0, mypy.stdout + mypy.stderr


WEBHOOK_DELIVERY = """
from cdk.http import Request
from internal.source import ExampleSource

for headers in ({"x-github-delivery": "gh-72d3"}, {"webhook-id": "msg_2Kf9"}, {}):
    headers["content-type"] = "application/json"
    request = Request("POST", "/", "", headers, b'{"action": "opened"}')
    print(ExampleSource().make_event(request).get_id())
"""


def test_the_webhook_example_makes_the_callers_delivery_id_its_event_id(
    rendered: dict[str, Path],
) -> None:
    # A redelivered webhook then carries the same event id, which a sink can deduplicate.
    result = run_in(rendered["source-webhook"], sys.executable, "-c", WEBHOOK_DELIVERY)
    assert result.returncode == 0, result.stderr
    github, standard, neither = result.stdout.split()
    assert (github, standard) == ("gh-72d3", "msg_2Kf9")
    assert len(neither) == 36  # none given: the SDK's fresh UUID
