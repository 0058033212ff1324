"""Trim the generated project to its variant, then check what was generated.

Runs in the new project's directory. Removes the files that belong to another variant
(``hooks/variants.py`` has the map; files already absent are fine) and any
cache directory, and writes README.md's configuration table, the one
``python tests/template/template_support.py`` made from the variant's config model
(``hooks/config_tables/<variant>.md``), with the project's own
``tools/config_table.py``. It records the template's commit, when the template is a git
checkout, in ``.cookiecutter.json`` (``_commit``) and in README.md's ``cruft link``
command, so a project rendered with plain cookiecutter links to the commit it came from
and ``cruft update`` brings in what came since. Then it checks that every ``.py`` file
compiles and that no template marker was left in a text file outside the vendored
``cdk/``. On a problem it prints one line and exits 1. Answers arrive as JSON text, so
no answer can change this script.
"""

# The Jinja expressions below read as Python sets of undefined names until rendered.
# ruff: noqa: F821

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

HOOKS_DIR: str = json.loads({{template_hooks_dir | tojson | tojson}})
VARIANT: str = json.loads({{cookiecutter.__variant | tojson | tojson}})
FREE_TEXT: list[str] = [
    json.loads({{cookiecutter.description | tojson | tojson}}),
    json.loads({{cookiecutter.author_name | tojson | tojson}}),
    json.loads({{cookiecutter.author_email | tojson | tojson}}),
]

#: The project's own tool that keeps README.md's configuration table.
TABLE_TOOL = "tools/config_table.py"
#: Directories whose files are copied verbatim, so they are not checked for markers.
VERBATIM = ("cdk",)
CACHE_DIRS = ("__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis")
# Spelled with escapes: the literal markers would be read by Jinja when the hook is rendered.
MARKERS = ("\x7b\x7b", "\x7b%")
#: What README.md's ``cruft link`` command holds in place of the template's commit.
COMMIT_PLACEHOLDER = "TEMPLATE-COMMIT"
#: What it says instead when the template was no git checkout (a zip, a copy).
UNKNOWN_COMMIT = "<the template commit or release tag this project was made from>"


def remove_paths(root: Path, paths: Iterable[str]) -> None:
    """Delete ``paths`` under ``root``; a path that is already gone is not an error."""
    paths = list(paths)
    for relative in paths:
        (root / relative).unlink(missing_ok=True)
    # Leave no empty directory behind, at any depth.
    for relative in paths:
        directory = (root / relative).parent
        while directory != root and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
            directory = directory.parent


def remove_caches(root: Path) -> None:
    """Delete every cache directory (``__pycache__``, tool caches) under ``root``.

    They appear in the template when its code is run or checked in place, and
    cookiecutter would copy them into the project.
    """
    for name in CACHE_DIRS:
        for cache in sorted(root.rglob(name), reverse=True):
            if cache.is_dir():
                shutil.rmtree(cache, ignore_errors=True)


def fill_config_table(root: Path, tables: Path, variant: str) -> str | None:
    """Write README.md's configuration table for ``variant``; why not, or None."""
    try:
        table = (tables / f"{variant}.md").read_text(encoding="utf-8").rstrip("\n")
        spec = importlib.util.spec_from_file_location("config_table", root / TABLE_TOOL)
        assert spec is not None and spec.loader is not None  # a .py path always has both
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        readme = root / "README.md"
        readme.write_text(tool.with_table(readme.read_text("utf-8"), table), encoding="utf-8")
    except (OSError, ValueError) as exc:
        return f"README.md: no configuration table for {variant} from {tables.name}/: {exc!r}"
    return None


def template_commit(template: Path) -> str | None:
    """The commit ``template`` is checked out at, or None: not the top of a git checkout
    (a copy inside another repository does not count), or no git at hand."""
    try:
        found = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"],
            cwd=template,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = found.stdout.split()
    if found.returncode != 0 or len(lines) != 2 or not re.fullmatch(r"[0-9a-f]{40}", lines[1]):
        return None
    return lines[1] if Path(lines[0]).resolve() == template.resolve() else None


def record_commit(root: Path, commit: str | None) -> None:
    """Write ``commit`` into ``.cookiecutter.json`` and README.md's ``cruft link`` line."""
    answers_path = root / ".cookiecutter.json"
    if commit is not None and answers_path.exists():
        text = answers_path.read_text(encoding="utf-8")
        answers = json.loads(text)
        answers["_commit"] = commit
        ending = "\n" if text.endswith("\n") else ""
        answers_path.write_text(json.dumps(answers, indent=2, ensure_ascii=True) + ending, "utf-8")
    readme = root / "README.md"
    if readme.exists():
        text = readme.read_text(encoding="utf-8")
        readme.write_text(text.replace(COMMIT_PLACEHOLDER, commit or UNKNOWN_COMMIT), "utf-8")


def syntax_error(path: Path) -> str | None:
    """Why ``path`` does not compile as Python, or None."""
    try:
        compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        return f"{path.name} does not compile: {exc}"
    return None


def load_hook_module(hooks_dir: str, name: str) -> ModuleType:
    """Import ``name`` (``naming``: the template's filters; ``variants``: which files each
    variant has) from the template's hooks directory."""
    if hooks_dir not in sys.path:
        sys.path.insert(0, hooks_dir)
    return importlib.import_module(name)


def answer_forms(answers: Iterable[str], filters: ModuleType | None = None) -> list[str]:
    """Every way an answer may appear in a file: as typed, or as the filters embed it."""
    forms: set[str] = set()
    for answer in answers:
        forms.add(answer)
        for ascii_only in (True, False):
            forms.add(json.dumps(answer, ensure_ascii=ascii_only)[1:-1])
        if filters is not None:
            forms.add(filters.one_line(answer))
            forms.add(filters.toml_string(answer)[1:-1])
            forms.add(filters.yaml_string(answer)[1:-1])
    # Longest first, so a longer form is removed before a shorter one inside it.
    return sorted((form for form in forms if form), key=len, reverse=True)


def leftover_marker(text: str, forms: Iterable[str] = ()) -> str | None:
    """The first template marker in ``text`` that did not come from an answer, or None."""
    for form in forms:
        text = text.replace(form, "")
    for line in text.splitlines():
        for marker in MARKERS:
            if marker in line:
                return line.strip()
    return None


def check_project(
    root: Path, answers: Iterable[str] = (), filters: ModuleType | None = None
) -> list[str]:
    """One line per problem in the generated project under ``root``."""
    forms = answer_forms(answers, filters)
    problems = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if relative.parts[0] in (".git", *VERBATIM):
            continue
        if path.suffix == ".py":
            error = syntax_error(path)
            if error:
                problems.append(f"{relative}: {error}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # not a text file
        marker = leftover_marker(text, forms)
        if marker is not None:
            problems.append(f"{relative}: template marker left in {marker!r}")
    return problems


def main(root: Path | None = None) -> int:
    project = Path.cwd() if root is None else root
    remove_paths(project, load_hook_module(HOOKS_DIR, "variants").files_to_remove(VARIANT))
    remove_caches(project)
    problem = fill_config_table(project, Path(HOOKS_DIR) / "config_tables", VARIANT)
    record_commit(project, template_commit(Path(HOOKS_DIR).parent))
    problems = [problem] if problem else []
    problems += check_project(project, FREE_TEXT, load_hook_module(HOOKS_DIR, "naming"))
    if problems:
        print("Error: generated project is broken: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
