"""deploy/ agrees with ``internal.config.Config``, and its manifests with what a cluster asks.

A ConfigMap under deploy/ holds the config.yml a pod runs with, the Secret its
secret.yml, and the Deployment its environment (``K_SINK``, say). These tests load them
as the connector would, so a key removed from ``Config``, or a new required one, fails
here with the file to change, instead of crash-looping a pod on ``unknown key``.

They also hold the manifests to what an operator checks: Kubernetes' recommended labels,
selectors that keep two copies of the connector apart, a PodDisruptionBudget beside a
Deployment of several replicas, and pods that pass the restricted Pod Security profile
without a service account token.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cdk.config import ENVIRONMENT
from internal.config import Config
from tools.requirements import requirements

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


#: Kubernetes' recommended labels (app.kubernetes.io/...), on every manifest.
RECOMMENDED_LABELS = ("name", "instance", "version", "component", "part-of", "managed-by")
#: What the restricted Pod Security profile asks of a container, and the image's user.
RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def load(path: Path) -> dict[str, Any]:
    manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(manifest, dict), f"{shown(path)} holds no manifest"
    return manifest


def manifests() -> list[Path]:
    return sorted(DEPLOY.glob("*/*.yaml"))


def selectors(manifest: dict[str, Any]) -> list[dict[str, str]]:
    """Every label selector of a manifest (Deployment, Service, PodDisruptionBudget)."""
    spec = manifest.get("spec", {})
    found = []
    if manifest["kind"] == "Service" and "selector" in spec:
        found.append(spec["selector"])
    elif "matchLabels" in spec.get("selector", {}):
        found.append(spec["selector"]["matchLabels"])
    affinity = spec.get("template", {}).get("spec", {}).get("affinity", {})
    for rule in affinity.get("podAntiAffinity", {}).get(
        "preferredDuringSchedulingIgnoredDuringExecution", []
    ):
        found.append(rule["podAffinityTerm"]["labelSelector"]["matchLabels"])
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def effective_security(pod: dict[str, Any]) -> dict[str, Any]:
    """A container's security settings: the pod's, overridden by the container's own."""
    (container,) = pod["containers"]
    settings = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    for pod_only in ("fsGroup", "supplementalGroups", "fsGroupChangePolicy"):
        settings.pop(pod_only, None)
    return settings


@pytest.mark.parametrize("path", manifests(), ids=shown)
def test_every_manifest_carries_the_recommended_labels(path: Path) -> None:
    labels = load(path)["metadata"].get("labels", {})
    missing = [n for n in RECOMMENDED_LABELS if f"app.kubernetes.io/{n}" not in labels]
    assert not missing, f"{shown(path)} lacks the labels app.kubernetes.io/{missing}"


@pytest.mark.parametrize("mode", MODES)
def test_selectors_pick_this_copy_s_pods_and_not_another_s(mode: str) -> None:
    deployment = load(mode_file(mode, "deployment.yaml"))
    pods = deployment["spec"]["template"]["metadata"]["labels"]
    # A second copy of the connector in the same namespace: another instance label.
    other = {**pods, "app.kubernetes.io/instance": pods["app.kubernetes.io/instance"] + "-copy"}
    files = {mode_file(mode, name) for name in ("deployment.yaml", "service.yaml", "pdb.yaml")}
    checked = 0
    for path in sorted(p for p in files if p.exists()):
        for selector in selectors(load(path)):
            assert selects(selector, pods), f"{shown(path)}: {selector} misses its own pods"
            assert not selects(selector, other), f"{shown(path)}: {selector} takes a copy's pods"
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("mode", MODES)
def test_a_deployment_of_several_replicas_has_a_disruption_budget(mode: str) -> None:
    deployment = load(mode_file(mode, "deployment.yaml"))
    replicas = deployment["spec"]["replicas"]
    budget = DEPLOY / mode / "pdb.yaml"
    if replicas == 1:
        assert not budget.exists(), f"{shown(budget)} would block every drain of one replica"
        return
    assert budget.exists(), f"{replicas} replicas in {mode}/ and no PodDisruptionBudget"
    pdb = load(budget)
    assert pdb["kind"] == "PodDisruptionBudget"
    pods = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(pdb["spec"]["selector"]["matchLabels"], pods)
    assert 1 <= pdb["spec"]["minAvailable"] < replicas


def pods() -> list[tuple[Path, dict[str, Any]]]:
    """(manifest, pod spec) of every Deployment and Knative Service."""
    found = []
    for path in manifests():
        manifest = load(path)
        if manifest["kind"] in ("Deployment", "Service") and "template" in manifest["spec"]:
            found.append((path, manifest["spec"]["template"]["spec"]))
    return found


@pytest.mark.parametrize(("path", "pod"), pods(), ids=[shown(path) for path, _ in pods()])
def test_every_pod_is_restricted_and_has_no_service_account_token(
    path: Path, pod: dict[str, Any]
) -> None:
    assert pod.get("automountServiceAccountToken") is False, f"{shown(path)} mounts a token"
    settings = effective_security(pod)
    wrong = {k: settings.get(k) for k, v in RESTRICTED.items() if settings.get(k) != v}
    assert not wrong, f"{shown(path)}: {wrong}, the restricted profile asks {RESTRICTED}"
    if load(path)["apiVersion"].startswith("serving.knative.dev/"):
        # A Knative Service runs the same container as the Deployment: the same settings.
        deployment = load(DEPLOY / "kubernetes" / "deployment.yaml")["spec"]["template"]["spec"]
        assert settings == effective_security(deployment), f"{shown(path)} differs"


def test_constraints_pin_every_dependency_of_the_image() -> None:
    """constraints.txt, under which the Dockerfile installs, pins each dependency (and the
    etcd and otel extras) within pyproject.toml's bounds: a new or changed dependency
    needs a refresh of it (README.md, "Pinned versions")."""
    lines = (PROJECT_DIR / "constraints.txt").read_text(encoding="utf-8").splitlines()
    pins = dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))
    pinned = {canonicalize_name(name): version for name, version in pins.items()}
    problems = []
    for line in requirements(["etcd", "otel"]):
        requirement = Requirement(line)
        version = pinned.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version):
            problems.append(f"{line} (constraints.txt: {version or 'no pin'})")
    assert not problems, "refresh constraints.txt (README.md, Pinned versions): " + ", ".join(
        problems
    )
