"""The hook scripts, rendered as cookiecutter renders them, then run or imported."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from template_support import REPO, TEMPLATE_PROJECT, clean_env, default_answers, render_text

from hooks import variants

HOOKS = REPO / "hooks"
#: What cookiecutter renders the hooks with given no answers: cookiecutter.json's defaults.
DEFAULTS: dict[str, Any] = default_answers()
OPEN = "{" + "{"  # spelled apart so this file holds no template marker itself


def rendered_hook(tmp_path: Path, name: str, **answers: Any) -> Path:
    text = (HOOKS / f"{name}.py").read_text(encoding="utf-8")
    script = tmp_path / f"{name}.py"
    script.write_text(render_text(text, {**DEFAULTS, **answers}), encoding="utf-8")
    return script


def load(script: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"hook_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env=clean_env(),
    )


# --- pre_gen_project -----------------------------------------------------------------


def test_pre_gen_accepts_good_answers(tmp_path: Path) -> None:
    result = run(rendered_hook(tmp_path, "pre_gen_project"), tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_pre_gen_is_self_contained(tmp_path: Path) -> None:
    """cookiecutter runs a copy elsewhere: the hook needs no template file, no site-packages."""
    script = rendered_hook(tmp_path / "hook", "pre_gen_project", connector_name="Bad")
    args = [sys.executable, "-I", "-S", "-B", str(script)]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("Error: connector_name 'Bad' is invalid")


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ({"connector_name": "Bad_Name"}, "connector_name 'Bad_Name' is invalid"),
        ({"connector_name": 'x"; import os #'}, "connector_name 'x\"; import os #' is invalid"),
        ({"connector_name": "a'''\nb"}, "connector_name \"a'''\\nb\" is invalid"),
        ({"connector_name": "a\\"}, "connector_name 'a\\\\' is invalid"),
        ({"connector_name": f"{OPEN} x }}}}"}, f"connector_name '{OPEN} x }}}}' is invalid"),
        ({"author_email": "nobody"}, "author_email 'nobody' is invalid"),
        ({"author_email": '"""\\'}, 'author_email \'"""\\\\\' is invalid'),
    ],
)
def test_pre_gen_refuses_bad_answers_in_one_line(
    tmp_path: Path, answers: dict[str, str], expected: str
) -> None:
    result = run(rendered_hook(tmp_path, "pre_gen_project", **answers), tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_pre_gen_problems_lists_each_broken_rule(tmp_path: Path) -> None:
    module = load(rendered_hook(tmp_path, "pre_gen_project"))
    assert module.read_answers(module.ANSWERS_JSON) == {
        "connector_name": DEFAULTS["connector_name"],
        "author_email": DEFAULTS["author_email"],
    }
    assert module.problems({"connector_name": "ok", "author_email": "a@b.co"}) == []
    found = module.problems({"connector_name": "-x", "author_email": "x"})
    assert [line.split(" ")[0] for line in found] == ["connector_name", "author_email"]


def test_pre_gen_imports_unrendered_and_holds_the_rules() -> None:
    from hooks import naming, pre_gen_project

    assert pre_gen_project.read_answers(pre_gen_project.ANSWERS_JSON) is None
    assert pre_gen_project.NAME_PATTERN == r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"
    assert pre_gen_project.NAME_MAX_LENGTH == 63
    assert naming.name_problem is pre_gen_project.name_problem
    assert naming.email_problem is pre_gen_project.email_problem
    assert naming.NAME_RULE is pre_gen_project.NAME_RULE


def test_pre_gen_run_unrendered_fails_in_one_line(tmp_path: Path) -> None:
    result = run(HOOKS / "pre_gen_project.py", tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


# --- post_gen_project ----------------------------------------------------------------


@pytest.fixture
def post_gen(tmp_path: Path) -> ModuleType:
    return load(rendered_hook(tmp_path / "hook", "post_gen_project"))


@pytest.fixture(autouse=True)
def _hook_dir(tmp_path: Path) -> None:
    (tmp_path / "hook").mkdir()


def touch(root: Path, *paths: str, text: str = "") -> None:
    for relative in paths:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_files_to_remove_per_variant() -> None:
    sink = variants.files_to_remove("sink")
    poll = variants.files_to_remove("source-poll")
    webhook = variants.files_to_remove("source-webhook")
    assert "internal/source.py" in sink and "internal/sink.py" not in sink
    assert "internal/sink.py" in poll and "deploy/kubernetes/service.yaml" in poll
    assert "deploy/kubernetes/service.yaml" not in webhook
    assert "deploy/knative/service.yaml" in webhook
    assert "deploy/knative/sinkbinding.yaml" in sink
    with pytest.raises(ValueError, match="unknown variant 'source'"):
        variants.files_to_remove("source")


def test_the_variant_map_names_template_files_and_cookiecutter_variants() -> None:
    """A renamed file or a new variant must not leave the map silently stale."""
    for path in variants.ONLY_IN:
        assert (TEMPLATE_PROJECT / path).is_file(), f"hooks/variants.py names no file: {path}"
    for name, answers in variants.VARIANTS.items():
        assert default_answers(**answers)["__variant"] == name
    assert set().union(*variants.ONLY_IN.values()) <= set(variants.VARIANTS)


def test_remove_paths_tolerates_absent_files_and_drops_empty_dirs(
    tmp_path: Path, post_gen: ModuleType
) -> None:
    root = tmp_path / "p"
    touch(root, "internal/sink.py", "internal/config.py", "deploy/knative/service.yaml")
    post_gen.remove_paths(root, ["internal/sink.py", "deploy/knative/service.yaml", "nope.py"])
    assert (root / "internal/config.py").exists()
    assert not (root / "internal/sink.py").exists()
    assert not (root / "deploy").exists()
    post_gen.remove_paths(root, ["internal/sink.py"])  # a second run changes nothing


def test_remove_caches(tmp_path: Path, post_gen: ModuleType) -> None:
    root = tmp_path / "p"
    touch(root, "a/__pycache__/x.pyc", ".mypy_cache/x", "cdk/__pycache__/y.pyc", "a/keep.py")
    post_gen.remove_caches(root)
    assert {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} == {"a/keep.py"}


def test_syntax_error_names_the_file(tmp_path: Path, post_gen: ModuleType) -> None:
    touch(tmp_path, "good.py", text="x = 1\n")
    touch(tmp_path, "bad.py", text="def f(:\n")
    assert post_gen.syntax_error(tmp_path / "good.py") is None
    assert "bad.py does not compile" in post_gen.syntax_error(tmp_path / "bad.py")


def test_leftover_marker_ignores_markers_that_came_from_answers(post_gen: ModuleType) -> None:
    answer = f'say "{OPEN} x }}}}"\nplease'
    forms = post_gen.answer_forms([answer], post_gen.load_hook_module(post_gen.HOOKS_DIR, "naming"))
    assert post_gen.leftover_marker(f"name: {OPEN} cookiecutter.x }}}}") is not None
    assert post_gen.leftover_marker(f"a: {answer}", forms) is None
    assert post_gen.leftover_marker(f'a = "{post_gen.json.dumps(answer)[1:-1]}"', forms) is None
    assert post_gen.leftover_marker(f"a: {answer} {OPEN} y }}}}", forms) is not None
    yaml_form = post_gen.load_hook_module(post_gen.HOOKS_DIR, "naming").yaml_string(answer)
    assert post_gen.leftover_marker(f"a: {yaml_form}", forms) is None


def test_check_project_finds_each_problem_outside_cdk(tmp_path: Path, post_gen: ModuleType) -> None:
    root = tmp_path / "p"
    touch(root, "ok.py", text="x = 1\n")
    touch(root, "cdk/raw.py", text=f"s = '{OPEN}'\n")
    touch(root, "README.md", text=f"hello {OPEN} name }}}}\n")
    touch(root, "broken.py", text="x = (\n")
    (root / "blob.bin").write_bytes(b"\xff\xfe{{")
    problems = post_gen.check_project(root)
    assert len(problems) == 2
    assert problems[0].startswith("README.md: template marker left")
    assert problems[1].startswith("broken.py: broken.py does not compile")


def project_with_table_tool(root: Path) -> Path:
    """A project holding only what the hook's table step needs: the tool and README.md."""
    tool = "tools/config_table.py"
    touch(root, tool, text=(TEMPLATE_PROJECT / tool).read_text(encoding="utf-8"))
    markers = "<!-- config-table:begin (made by tools/config_table.py; do not edit by hand) -->"
    touch(root, "README.md", text=f"# x\n\n{markers}\n<!-- config-table:end -->\n")
    return root


def test_post_gen_main_trims_to_the_variant_and_passes(tmp_path: Path) -> None:
    script = rendered_hook(tmp_path / "hook", "post_gen_project", __variant="sink")
    root = project_with_table_tool(tmp_path / "p")
    touch(root, "internal/sink.py", "internal/source.py", "deploy/knative/sinkbinding.yaml")
    touch(root, "internal/__pycache__/x.pyc")
    result = run(script, root)
    assert (result.returncode, result.stderr) == (0, "")
    assert {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} == {
        "README.md",
        "internal/sink.py",
        "tools/config_table.py",
    }
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "| `port` | integer | `8080` |" in readme and "| `target` |" not in readme
    assert (REPO / "hooks" / "config_tables" / "sink.md").read_text(encoding="utf-8") in readme


def test_fill_config_table_says_why_it_cannot(tmp_path: Path, post_gen: ModuleType) -> None:
    root = project_with_table_tool(tmp_path / "p")
    tables = tmp_path / "tables"
    touch(tables, "sink.md", text="| key |\n|---|\n| `port` |\n")
    assert post_gen.fill_config_table(root, tables, "sink") is None
    assert "-->\n| key |\n|---|\n| `port` |\n<!--" in (root / "README.md").read_text()
    problem = post_gen.fill_config_table(root, tables, "source-poll")
    assert problem.startswith("README.md: no configuration table for source-poll from tables/")
    assert "FileNotFoundError" in problem
    (root / "tools/config_table.py").unlink()
    assert "FileNotFoundError" in post_gen.fill_config_table(root, tables, "sink")


def test_post_gen_main_fails_in_one_line(tmp_path: Path) -> None:
    script = rendered_hook(tmp_path / "hook", "post_gen_project")
    root = tmp_path / "p"
    touch(root, "a.py", text="x = (\n")
    touch(root, "b.txt", text=f"{OPEN} left }}}}\n")
    result = run(script, root)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "a.py" in result.stderr and "b.txt" in result.stderr


def test_template_commit_only_of_the_top_of_a_git_checkout(
    tmp_path: Path, post_gen: ModuleType
) -> None:
    repo = tmp_path / "template"
    touch(repo, "cookiecutter.json", "inner/cookiecutter.json", text="{}\n")
    assert post_gen.template_commit(repo) is None  # not a git checkout
    env = {**clean_env(), "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1"}
    identity = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    for command in (["init", "-q"], ["add", "-A"], [*identity, "commit", "-q", "-m", "t"]):
        subprocess.run(["git", *command], cwd=repo, env=env, check=True, capture_output=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    assert post_gen.template_commit(repo) == head
    assert post_gen.template_commit(repo / "inner") is None  # a copy inside another repository


def test_record_commit_fills_the_readme_and_the_answers(
    tmp_path: Path, post_gen: ModuleType
) -> None:
    line = f"cruft link <template-url> --checkout {post_gen.COMMIT_PLACEHOLDER} --extra-context x"
    touch(tmp_path, "README.md", text=line + "\n")
    touch(tmp_path, ".cookiecutter.json", text='{"connector_type": "sink"}\n')
    post_gen.record_commit(tmp_path, "a" * 40)
    assert f"--checkout {'a' * 40} " in (tmp_path / "README.md").read_text()
    answers = (tmp_path / ".cookiecutter.json").read_text()
    assert answers.endswith("}\n") and '"_commit": "' + "a" * 40 in answers
    touch(tmp_path, "README.md", text=line + "\n")
    post_gen.record_commit(tmp_path, None)
    assert post_gen.UNKNOWN_COMMIT in (tmp_path / "README.md").read_text()
