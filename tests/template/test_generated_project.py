"""Each rendered project passes its own checks in an environment of its declared packages.

One shared virtual environment holds only the generated project's dependencies and
its ``test`` extras (see the ``generated_venv`` fixture); a package the project uses
but does not declare makes these tests fail.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from template_support import COOKIECUTTER_JSON, VARIANTS, render, run_in, venv_python

pytestmark = pytest.mark.slow

NO_TESTS_COLLECTED = 5


def run(venv: Path, project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_in(project, str(venv_python(venv)), *args, timeout=900)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generated_tests_pass(
    rendered: dict[str, Path], generated_venv: Path, variant: str
) -> None:
    project = rendered[variant]
    result = run(generated_venv, project, "-m", "pytest", "-q", "-p", "no:cacheprovider")
    output = result.stdout[-4000:] + result.stderr[-4000:]
    has_tests = any((project / "tests").glob("test_*.py"))
    if result.returncode == NO_TESTS_COLLECTED and not has_tests:
        pytest.skip("the template ships no generated tests yet")
    assert result.returncode == 0, output


@pytest.mark.parametrize("variant", VARIANTS)
def test_generated_lint_and_types_pass_with_declared_tools(
    rendered: dict[str, Path], generated_venv: Path, variant: str, tmp_path: Path
) -> None:
    project = rendered[variant]
    ruff = run(generated_venv, project, "-m", "ruff", "check", "--no-cache", ".")
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr
    mypy = run(generated_venv, project, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy"))
    assert mypy.returncode == 0, mypy.stdout + mypy.stderr


def test_lint_passes_with_the_newest_python_choice(generated_venv: Path, tmp_path: Path) -> None:
    """ruff's pyupgrade rules follow ``python_version``; the vendored kit keeps 3.11 syntax."""
    newest = COOKIECUTTER_JSON["python_version"][-1]
    for variant, answers in VARIANTS.items():
        project = render(tmp_path / variant, **answers, python_version=newest)
        ruff = run(generated_venv, project, "-m", "ruff", "check", "--no-cache", ".")
        assert ruff.returncode == 0, f"{variant}: {ruff.stdout}{ruff.stderr}"


def test_the_shared_environment_holds_only_declared_packages(generated_venv: Path) -> None:
    result = run(generated_venv, generated_venv, "-m", "pip", "list", "--format=freeze")
    installed = {line.split("==")[0].lower() for line in result.stdout.splitlines()}
    # cookiecutter and the template's own tools are not what a project declares.
    assert not installed & {"cookiecutter", "hypothesis", "cruft", "jinja2"}
    assert {"cloudevents", "pydantic", "pytest", "ruff", "mypy"} <= installed
