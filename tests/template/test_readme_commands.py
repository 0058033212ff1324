"""An untouched project runs as its README says: the commands, ports and fallbacks agree.

``config.yml`` leaves ``target``, ``port`` and ``log_level`` to the environment
(``$CONNECTOR_TARGET``/``$K_SINK``, ``$CONNECTOR_PORT``, ``$LOG_LEVEL``), so the README's
commands set them; these tests run those commands with ``--check-config`` and load the
configuration each one gives, as ``cmd/main.py`` would.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from template_support import VARIANTS, clean_env, run_in

from cdk.testing.runner import ConnectorProcess
from cdk.testing.target import CaptureTarget, free_port
from hooks.variants import SERVES_HTTP, SOURCES

#: The variables the kit reads, kept out of every run unless a command sets them.
KIT_VARIABLES = ("CONNECTOR_CONFIG", "CONNECTOR_SECRET", "CONNECTOR_TARGET", "K_SINK")
KIT_VARIABLES += ("CONNECTOR_PORT", "LOG_LEVEL", "K_CE_OVERRIDES")
SINK_DEFAULT_PORT = 8080


def sh_commands(readme: str) -> list[list[str]]:
    """Every command of the README's ``sh`` blocks, as words (continuations joined)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words:
                    commands.append(words)
    return commands


def split_assignments(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """``A=1 B=2 python x`` -> ({"A": "1", "B": "2"}, ["python", "x"])."""
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words[0].partition("=")
        env[name] = value
        words = words[1:]
    return env, words


def run_commands(project: Path) -> list[tuple[dict[str, str], list[str]]]:
    """The README's ``python cmd/main.py`` commands: (the variables they set, the words)."""
    found = []
    for words in sh_commands((project / "README.md").read_text(encoding="utf-8")):
        env, rest = split_assignments(words)
        if rest[:2] == ["python", "cmd/main.py"]:
            found.append((env, rest))
    return found


def kit_free_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in clean_env().items() if k not in KIT_VARIABLES}
    return {**env, **variables}


def effective_config(project: Path, variables: dict[str, str], config: str = "config.yml") -> Any:
    """The configuration ``cmd/main.py`` would run with, given these environment variables."""
    code = (
        "import json, sys; sys.path.insert(0, '.')\n"
        "from cdk.config import load_config\n"
        "from internal.config import Config\n"
        f"environ = json.loads({json.dumps(json.dumps(variables))})\n"
        f"print(load_config(Config, {config!r}, environ=environ).model_dump_json())\n"
    )
    result = run_in(project, sys.executable, "-c", code, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_readme_run_command_passes_check_config(
    rendered: dict[str, Path], variant: str
) -> None:
    project = rendered[variant]
    commands = run_commands(project)
    assert len(commands) >= 2, "the README shows how to check the config and how to run"
    for variables, words in commands:
        args = [sys.executable, *words[1:]]
        if "--check-config" not in args:
            args.append("--check-config")
        result = run_in(project, *args, timeout=60, env=kit_free_env(**variables))
        shown = " ".join([*(f"{k}={v}" for k, v in variables.items()), *words])
        assert result.returncode == 0, f"{shown}: {result.stdout}{result.stderr}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_environment_fallbacks_work_on_an_untouched_project(
    rendered: dict[str, Path], variant: str
) -> None:
    project = rendered[variant]
    variables = {"LOG_LEVEL": "DEBUG"}
    if variant in SERVES_HTTP:
        variables["CONNECTOR_PORT"] = "9000"
    if variant in SOURCES:
        variables["K_SINK"] = "http://broker.example:8080/"
    config = effective_config(project, variables)
    assert config["log_level"] == "DEBUG", "config.yml sets log_level: $LOG_LEVEL is ignored"
    if variant in SERVES_HTTP:
        assert config["port"] == 9000, "config.yml sets port: $CONNECTOR_PORT is ignored"
    if variant in SOURCES:
        assert config["target"] == variables["K_SINK"], "config.yml sets target: $K_SINK ignored"
        variables["CONNECTOR_TARGET"] = "http://127.0.0.1:9/"
        assert effective_config(project, variables)["target"] == "http://127.0.0.1:9/"


@pytest.mark.parametrize("variant", VARIANTS)
def test_readme_ports_and_targets_agree(rendered: dict[str, Path], variant: str) -> None:
    """A source's target is where a local sink listens; curl goes where the connector does."""
    project = rendered[variant]
    readme = (project / "README.md").read_text(encoding="utf-8")
    # The last command that runs the connector for real (a dry run, or a look at the
    # positions, needs no target).
    offline = ("--dry-run", "--positions", "--set-position", "--reset-positions")
    runs = [c for c in run_commands(project) if not set(offline) & set(c[1])]
    variables, _ = runs[-1]
    config = effective_config(project, variables)
    if variant in SOURCES:
        assert config["target"] == f"http://127.0.0.1:{SINK_DEFAULT_PORT}"
    if variant in SERVES_HTTP:
        curl_ports = {int(p) for p in re.findall(r"curl -i http://127\.0\.0\.1:(\d+)/", readme)}
        assert curl_ports == {config["port"]}, f"curl posts to {curl_ports}"
        # A webhook source next to a local sink: both default to 8080, so one must move.
        assert (config["port"] == SINK_DEFAULT_PORT) is (variant == "sink")


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_key_config_yml_shows_in_a_comment_is_valid(
    rendered: dict[str, Path], variant: str, tmp_path: Path
) -> None:
    project = rendered[variant]
    text = (project / "config.yml").read_text(encoding="utf-8")
    shown = re.findall(r"^# ([a-z_]+: .*)$", text, flags=re.MULTILINE)
    assert shown, "config.yml shows no key in a comment"
    for line in shown:
        key = line.split(":", 1)[0]
        uncommented = tmp_path / f"{key}.yml"
        uncommented.write_text(text + line + "\n", encoding="utf-8")
        assert key in yaml.safe_load(uncommented.read_text(encoding="utf-8"))
        variables = {"K_SINK": "http://127.0.0.1:9/"} if variant in SOURCES else {}
        assert key in effective_config(project, variables, str(uncommented)), line


def test_a_polling_source_serves_metrics_on_the_host_config_yml_shows(
    rendered: dict[str, Path],
) -> None:
    """``host`` is the address of a polling source's ``metrics_port``, as config.yml says."""
    project = rendered["source-poll"]
    text = (project / "config.yml").read_text(encoding="utf-8")
    shown = dict(line.split(": ", 1) for line in re.findall(r"^# ([a-z_]+: \S+)", text, re.M))
    assert shown["host"] == "127.0.0.1" and "metrics_port" in shown
    config = {**yaml.safe_load(text), "host": shown["host"], "metrics_port": free_port()}
    with CaptureTarget.in_thread() as target:
        config["target"] = target.url
        with ConnectorProcess(project, config) as process:
            line = process.wait_for_line(r"metrics listening on (http://\S+)")
            status = urllib.request.urlopen(line.group(1) + "/healthz", timeout=10).status
            code = process.stop()
    assert line.group(1) == f"http://127.0.0.1:{config['metrics_port']}"
    assert (status, code) == (200, 0), process.output
