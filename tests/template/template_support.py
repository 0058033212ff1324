"""Rendering the template for its own tests, and keeping its config tables current.

``render`` runs cookiecutter's Python API with a private user config (no replay files
in the home directory). ``python tests/template/template_support.py`` rewrites
``hooks/config_tables/`` (each variant's configuration table, made from its config
model, which post_gen_project writes into the generated README) after a change to
``cdk/config.py`` or ``internal/config.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cookiecutter.environment import StrictEnvironment
from cookiecutter.main import cookiecutter
from cookiecutter.prompt import prompt_for_config

REPO = Path(__file__).resolve().parents[2]
# hooks/ holds the template's Jinja extension and its variant map; cookiecutter imports
# the extension from REPO too.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from hooks.variants import VARIANTS, files_to_remove  # noqa: E402

TEMPLATE_PROJECT = REPO / "{{cookiecutter.connector_name}}"
CACHE_DIRS = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"})

#: The license each variant is rendered with, so every license is covered somewhere.
VARIANT_LICENSE = {"source-poll": "Apache-2.0", "source-webhook": "MIT", "sink": "BSD-3-Clause"}
#: The template's questions and their defaults, as ``cookiecutter.json`` holds them.
COOKIECUTTER_JSON: dict[str, Any] = json.loads((REPO / "cookiecutter.json").read_text("utf-8"))
LICENSES: tuple[str, ...] = tuple(COOKIECUTTER_JSON["license"])
#: File names in the template that render to another name. pyproject.toml is named
#: ``{{cookiecutter.__pyproject_toml}}`` in the template, so that tools run inside the
#: template (ruff, pytest) do not read its Jinja as their config.
RENAMED = {"{{cookiecutter.__pyproject_toml}}": "pyproject.toml"}


def expected_files(variant: str) -> set[str]:
    """The files a render of ``variant`` holds: the template's, less the other variants'."""
    files = {RENAMED.get(path, path) for path in files_under(TEMPLATE_PROJECT)}
    return files - set(files_to_remove(variant))


def default_answers(**answers: Any) -> dict[str, Any]:
    """The context cookiecutter renders with ``--no-input``: the defaults of
    cookiecutter.json (its private variables derived) with ``answers`` over them."""
    context = {"cookiecutter": {**COOKIECUTTER_JSON, **answers}}
    return dict(prompt_for_config(context, no_input=True))


def write_user_config(directory: Path) -> Path:
    """A cookiecutter user config that keeps replay files and clones under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "cookiecutter-config.yaml"
    config.write_text(
        f"cookiecutters_dir: {json.dumps(str(directory / 'cookiecutters'))}\n"
        f"replay_dir: {json.dumps(str(directory / 'replay'))}\n",
        encoding="utf-8",
    )
    return config


def render(output_dir: Path, **answers: str) -> Path:
    """Render the template with ``answers`` (no prompts) into ``output_dir``; the project."""
    output_dir.mkdir(parents=True, exist_ok=True)
    config = write_user_config(output_dir.parent / f".cc-{output_dir.name}")
    return Path(
        cookiecutter(
            str(REPO),
            no_input=True,
            extra_context=answers,
            output_dir=str(output_dir),
            config_file=str(config),
        )
    )


def files_under(root: Path) -> set[str]:
    """Relative paths of the files under ``root``, without cache directories."""
    return {
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and not CACHE_DIRS & set(path.relative_to(root).parts)
    }


def render_text(text: str, cookiecutter_context: Mapping[str, Any]) -> str:
    """Render ``text`` as cookiecutter renders a hook, with the template's extensions."""
    context = {"cookiecutter": dict(cookiecutter_context)}
    context["cookiecutter"].setdefault("_extensions", COOKIECUTTER_JSON["_extensions"])
    env = StrictEnvironment(context=context, keep_trailing_newline=True)
    return str(env.from_string(text).render(**context))


def tool(name: str) -> str:
    """The path of a command-line tool installed next to this Python, or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed: pip install -r tests/requirements.txt")
    return found


def declared_requirements(pyproject: Path) -> list[str]:
    """A project's runtime dependencies followed by its ``test`` extras."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["test"]]


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(cache: Path, requirements: list[str]) -> Path:
    """A virtual environment with exactly ``requirements``, reused while they are unchanged."""
    key = hashlib.sha256(
        "\n".join([sys.version, *sorted(requirements)]).encode("utf-8")
    ).hexdigest()[:16]
    venv = cache / key
    complete = venv / ".complete"
    if complete.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    venv.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    listing = venv / "requirements.txt"
    listing.write_text("\n".join(requirements) + "\n", encoding="utf-8")
    subprocess.run(
        [
            str(venv_python(venv)),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            str(listing),
        ],
        check=True,
        timeout=1200,
        env=clean_env(),
    )
    complete.write_text("\n".join(requirements) + "\n", encoding="utf-8")
    return venv


def clean_env() -> dict[str, str]:
    """The environment for a subprocess that must not see this test run's Python setup."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_in(
    cwd: Path,
    *command: str,
    timeout: float = 120,
    check: bool = False,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in ``cwd`` with a clean environment (or ``env``), capturing its output."""
    return subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        check=check,
        text=True,
        timeout=timeout,
        env=clean_env() if env is None else dict(env),
    )


# --- the README tables, made from the config models ------------------------------------

#: The configuration table of each variant's README, which post_gen_project writes in.
CONFIG_TABLES = REPO / "hooks" / "config_tables"
README_TEMPLATE = TEMPLATE_PROJECT / "README.md"


def table_from_model(project: Path, python: str = sys.executable) -> str:
    """The table ``tools/config_table.py`` makes from a rendered project's ``Config``."""
    code = (
        "import sys; sys.path.insert(0, 'tools'); import config_table as t; print(t.model_table())"
    )
    result = subprocess.run(
        [python, "-c", code],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    )
    return result.stdout


def update_config_tables() -> list[str]:
    """Rewrite hooks/config_tables/ from the models; the variants whose table changed."""
    CONFIG_TABLES.mkdir(exist_ok=True)
    before = {}
    for variant in VARIANTS:
        path = CONFIG_TABLES / f"{variant}.md"
        before[variant] = path.read_text(encoding="utf-8") if path.exists() else ""
        path.write_text(before[variant], encoding="utf-8")  # a render needs the file
    changed = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, answers in VARIANTS.items():
            table = table_from_model(render(Path(tmp) / variant, **answers))
            if table != before[variant]:
                (CONFIG_TABLES / f"{variant}.md").write_text(table, encoding="utf-8")
                changed.append(variant)
    return changed


if __name__ == "__main__":
    changed = update_config_tables()
    print("hooks/config_tables/: " + (", ".join(changed) + " updated" if changed else "current"))
