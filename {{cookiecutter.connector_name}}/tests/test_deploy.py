"""deploy/ agrees with ``internal.config.Config``: each pod's config.yml and secret.yml load.

A ConfigMap under deploy/ holds the config.yml a pod runs with, the Secret its
secret.yml, and the Deployment its environment (``K_SINK``, say). These tests load them
as the connector would, so a key removed from ``Config``, or a new required one, fails
here with the file to change, instead of crash-looping a pod on ``unknown key``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cdk.config import ENVIRONMENT
from internal.config import Config

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEPLOY = PROJECT_DIR / "deploy"
#: Each way to run on Kubernetes (a folder with a ConfigMap); what a folder lacks, it
#: takes from deploy/kubernetes/ (the Secret, say).
MODES = sorted(path.parent.name for path in DEPLOY.glob("*/configmap.yaml"))


def mode_file(mode: str, name: str) -> Path:
    path = DEPLOY / mode / name
    return path if path.exists() else DEPLOY / "kubernetes" / name


def shown(path: Path) -> str:
    return path.relative_to(PROJECT_DIR).as_posix()


def embedded(path: Path, section: str, key: str) -> dict[str, Any]:
    """The YAML file a manifest carries (a ConfigMap's config.yml, a Secret's secret.yml)."""
    manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
    data = yaml.safe_load(manifest[section][key]) or {}
    assert isinstance(data, dict), f"{shown(path)}: {key} must hold a mapping of keys"
    return data


def pod_environment(mode: str) -> dict[str, str]:
    deployment = yaml.safe_load(mode_file(mode, "deployment.yaml").read_text(encoding="utf-8"))
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def pod_files(mode: str) -> tuple[Path, dict[str, Any], Path, dict[str, Any]]:
    """(the ConfigMap, its config.yml, the Secret, its secret.yml) of ``mode``."""
    configmap, secret = mode_file(mode, "configmap.yaml"), mode_file(mode, "secret.yaml")
    config = embedded(configmap, "data", "config.yml")
    return configmap, config, secret, embedded(secret, "stringData", "secret.yml")


@pytest.mark.parametrize("mode", MODES)
def test_deploy_keys_match_the_config_model(mode: str) -> None:
    configmap, config, secret, secrets = pod_files(mode)
    known = {field.alias or name for name, field in Config.model_fields.items()}
    problems = [
        f"{shown(path)} sets `{key}`, which Config (internal/config.py) does not have:"
        f" remove it from {shown(path)}, or add the field to Config"
        for path, data in ((configmap, config), (secret, secrets))
        for key in data
        if key not in known
    ]
    from_env = {key for name, key, _ in ENVIRONMENT if key and name in pod_environment(mode)}
    problems += [
        f"Config (internal/config.py) requires `{key}`, which {shown(configmap)} does not"
        f" set: add it to the config.yml there (a secret one to {shown(secret)})"
        for key in sorted(known - config.keys() - secrets.keys() - from_env)
        if Config.model_fields[key].is_required()
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("mode", MODES)
def test_deploy_config_passes_check_config(mode: str, tmp_path: Path) -> None:
    configmap, config, secret, secrets = pod_files(mode)
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (tmp_path / "secret.yml").write_text(yaml.safe_dump(secrets), encoding="utf-8")
    kit_variables = {name for name, _, _ in ENVIRONMENT}
    env = {k: v for k, v in os.environ.items() if k not in kit_variables}
    files = ["--config", str(tmp_path / "config.yml"), "--secret", str(tmp_path / "secret.yml")]
    result = subprocess.run(
        [sys.executable, "cmd/main.py", "--check-config", *files],
        cwd=PROJECT_DIR,
        env={**env, **pod_environment(mode)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (
        f"{shown(configmap)} and {shown(secret)} fail --check-config (a pod would exit 2):\n"
        + result.stdout
        + result.stderr
    )
