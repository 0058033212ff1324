"""The update path: ``cruft create`` from a clone, ``cruft check``, then ``cruft update``.

The working tree may hold uncommitted changes, so the template is copied into a fresh
git repository and committed there, as a published template would be.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from template_support import REPO, clean_env, tool

pytestmark = pytest.mark.slow

SKIP = shutil.ignore_patterns(
    ".git", ".venv*", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis"
)


def git_env(home: Path) -> dict[str, str]:
    env = clean_env()
    env.update(
        HOME=str(home),
        GIT_AUTHOR_NAME="Template Test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="Template Test",
        GIT_COMMITTER_EMAIL="test@example.com",
        GIT_CONFIG_NOSYSTEM="1",
    )
    return env


def run(*command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, check=False, text=True, timeout=300
    )


def commit_all(repo: Path, env: dict[str, str], message: str) -> str:
    for command in (["git", "add", "-A"], ["git", "commit", "-q", "-m", message]):
        result = run(*command, cwd=repo, env=env)
        assert result.returncode == 0, result.stderr
    return run("git", "rev-parse", "HEAD", cwd=repo, env=env).stdout.strip()


def ci_cruft_check(project: Path) -> list[str]:
    """The generated CI's ``cruft check`` command, run with the installed cruft."""
    workflow = yaml.safe_load((project / ".github/workflows/ci.yml").read_text("utf-8"))
    runs = [str(s.get("run", "")) for job in workflow["jobs"].values() for s in job["steps"]]
    (line,) = [line for run in runs for line in run.splitlines() if line.startswith("cruft ")]
    return [tool("cruft"), *shlex.split(line)[1:]]


def published_template(tmp_path: Path, env: dict[str, str]) -> tuple[Path, str]:
    """The working tree, committed into a fresh repository: (its path, the commit)."""
    template = tmp_path / "template"
    shutil.copytree(REPO, template, ignore=SKIP)
    assert run("git", "init", "-q", cwd=template, env=env).returncode == 0
    return template, commit_all(template, env, "template")


def plain_render(template: Path, out: Path, env: dict[str, str], *answers: str) -> Path:
    """``cookiecutter --no-input`` of ``template`` with ``answers``: the project made."""
    made = run(
        sys.executable,
        "-m",
        "cookiecutter",
        "--no-input",
        "--output-dir",
        str(out),
        str(template),
        *answers,
        cwd=out.parent,
        env=env,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    (project,) = out.iterdir()
    return project


def test_cruft_create_check_and_update(tmp_path: Path) -> None:
    env = git_env(tmp_path)
    template, first = published_template(tmp_path, env)

    out = tmp_path / "out"
    cruft = tool("cruft")
    created = run(
        cruft,
        "create",
        "--no-input",
        "--output-dir",
        str(out),
        str(template),
        "--extra-context",
        json.dumps({"connector_type": "sink", "connector_name": "sink-db"}),
        cwd=tmp_path,
        env=env,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    project = out / "sink-db"
    state = json.loads((project / ".cruft.json").read_text(encoding="utf-8"))
    assert state["commit"] == first
    assert state["context"]["cookiecutter"]["connector_type"] == "sink"
    assert (project / "internal" / "sink.py").exists()
    assert not (project / "internal" / "source.py").exists()
    checked = run(*ci_cruft_check(project), cwd=project, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # The template moves on: check notices, update brings the change in.
    run("git", "init", "-q", cwd=project, env=env)
    commit_all(project, env, "generated")
    gitignore = template / "{{cookiecutter.connector_name}}" / ".gitignore"
    gitignore.write_text(gitignore.read_text(encoding="utf-8") + "# template update\n")
    commit_all(template, env, "update")
    assert run(*ci_cruft_check(project), cwd=project, env=env).returncode != 0
    updated = run(cruft, "update", "--skip-apply-ask", cwd=project, env=env)
    assert updated.returncode == 0, updated.stdout + updated.stderr
    assert "# template update" in (project / ".gitignore").read_text(encoding="utf-8")
    assert run(cruft, "check", cwd=project, env=env).returncode == 0


def test_a_plain_cookiecutter_project_links_with_its_recorded_answers(tmp_path: Path) -> None:
    env = git_env(tmp_path)
    template, commit = published_template(tmp_path, env)
    answers = ("connector_type=source", "source_style=webhook", "connector_name=source-hook")
    project = plain_render(template, tmp_path / "out", env, *answers, "license=MIT")
    run("git", "init", "-q", cwd=project, env=env)
    commit_all(project, env, "generated")
    answers = (project / ".cookiecutter.json").read_text(encoding="utf-8")
    cruft = tool("cruft")
    linked = run(
        cruft,
        "link",
        "--no-input",
        str(template),
        "--extra-context",
        answers,
        cwd=project,
        env=env,
    )
    assert linked.returncode == 0, linked.stdout + linked.stderr
    state = json.loads((project / ".cruft.json").read_text(encoding="utf-8"))
    assert state["commit"] == commit
    assert state["context"]["cookiecutter"]["license"] == "MIT"
    # The recorded answers reproduce the project exactly: nothing differs from the template.
    diff = run(cruft, "diff", "--exit-code", cwd=project, env=env)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert run(cruft, "check", cwd=project, env=env).returncode == 0
    readme = project / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8") + "local change\n", encoding="utf-8")
    assert run(cruft, "diff", "--exit-code", cwd=project, env=env).returncode != 0


def readme_link_command(project: Path, template: Path) -> list[str]:
    """README.md's ``cruft link`` line, for ``template``, run as the README's shell would."""
    readme = (project / "README.md").read_text(encoding="utf-8")
    (line,) = [line for line in readme.splitlines() if line.startswith("cruft link ")]
    answers = (project / ".cookiecutter.json").read_text(encoding="utf-8")
    line = line.replace("<template-url>", shlex.quote(str(template)))
    line = line.replace('"$(cat .cookiecutter.json)"', shlex.quote(answers))
    return [tool("cruft"), *shlex.split(line)[1:], "--no-input"]


def test_a_plain_cookiecutter_project_linked_later_gets_the_changes_since(
    tmp_path: Path,
) -> None:
    """Rendered at one commit, linked after the template moved on: cruft check says the
    project is out of date, and cruft update brings the change in."""
    env = git_env(tmp_path)
    template, first = published_template(tmp_path, env)
    project = plain_render(template, tmp_path / "out", env, "connector_type=sink")
    assert json.loads((project / ".cookiecutter.json").read_text("utf-8"))["_commit"] == first
    run("git", "init", "-q", cwd=project, env=env)
    commit_all(project, env, "generated")

    gitignore = template / "{{cookiecutter.connector_name}}" / ".gitignore"
    gitignore.write_text(gitignore.read_text(encoding="utf-8") + "# since the render\n")
    commit_all(template, env, "a change after the render")

    linked = run(*readme_link_command(project, template), cwd=project, env=env)
    assert linked.returncode == 0, linked.stdout + linked.stderr
    assert json.loads((project / ".cruft.json").read_text("utf-8"))["commit"] == first
    commit_all(project, env, "linked")
    checked = run(*ci_cruft_check(project), cwd=project, env=env)
    assert checked.returncode != 0, "cruft check calls a project lacking a change up to date"
    updated = run(tool("cruft"), "update", "--skip-apply-ask", cwd=project, env=env)
    assert updated.returncode == 0, updated.stdout + updated.stderr
    assert "# since the render" in (project / ".gitignore").read_text(encoding="utf-8")
    assert run(*ci_cruft_check(project), cwd=project, env=env).returncode == 0
