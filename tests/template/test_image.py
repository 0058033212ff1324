"""The image, run without a container engine: from exactly the files its COPY lines copy,
with its ENV, WORKDIR and USER, and the mounts of the README's ``docker run`` line.

No Docker engine is at hand, so :mod:`image` lays the image's files out under a
temporary root and runs the ``CMD`` there as the image's user (uid 10001 when the tests
run as root). Only the values that name the network change: each run gets a free port
and a capture target on loopback.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from image import (
    Container,
    EngineContainer,
    ImageRoot,
    build_image,
    docker,
    engine_missing,
    interpreter_for,
    parse_docker_run,
    parse_dockerfile,
)
from packaging.utils import canonicalize_name
from template_support import VARIANTS

from cdk.testing.target import CaptureTarget, free_port
from hooks.variants import SERVES_HTTP

READY = r"(?:sink|source) listening on http://[^\s:]+:(\d+)|source started"


@pytest.fixture
def image_root(rendered: dict[str, Path], variant: str) -> Iterator[ImageRoot]:
    """The image of ``variant`` laid out with the README's ``docker run`` mounts."""
    project = rendered[variant]
    image = parse_dockerfile((project / "Dockerfile").read_text(encoding="utf-8"))
    run = parse_docker_run((project / "README.md").read_text(encoding="utf-8"))
    root = ImageRoot(project, image, run)
    try:
        yield root
    finally:
        root.remove()


def mount_readme_volumes(root: ImageRoot, **config: object) -> None:
    """Mount what the README's ``docker run`` mounts: the project's config.yml, with
    ``config`` over it, and any named volume."""
    project_config = yaml.safe_load((root.project / "config.yml").read_text("utf-8")) or {}
    for source, container_path in root.run.mounts:
        if source.endswith("/config.yml"):
            assert container_path == root.image.env["CONNECTOR_CONFIG"], "config.yml not mounted"
            text = yaml.safe_dump({**project_config, **config}, sort_keys=False)
            root.mount(container_path, text.encode())
        else:
            assert not source.startswith(("/", "$", ".")), f"unexpected bind mount {source}"
            root.mount(container_path)


def start(root: ImageRoot, target: CaptureTarget, *args: str) -> Container:
    """The image's CMD (``args`` after it) with the README's -e options, on loopback."""
    python, python_env = interpreter_for(root.uid)
    overrides = {}
    if "CONNECTOR_PORT" in {**root.image.env, **root.run.env}:
        overrides["CONNECTOR_PORT"] = str(free_port())
    if "CONNECTOR_TARGET" in root.run.env:
        overrides["CONNECTOR_TARGET"] = target.url
    return Container(root, root.environment(python_env, **overrides), python, list(args))


def wait_for_events(
    container: Container | EngineContainer, target: CaptureTarget, count: int
) -> None:
    try:
        target.wait_until(lambda: len(target.events) >= count, timeout=30)
    except TimeoutError:
        raise AssertionError(f"{count} event(s) not delivered:\n{container.output}") from None


def get(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=b"{}" if method == "POST" else None)
    request.method = method
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_image_runs_with_only_config_yml_mounted(image_root: ImageRoot, variant: str) -> None:
    assert "CONNECTOR_SECRET" in image_root.image.env, "the image names where secret.yml goes"
    http = {"host": "127.0.0.1"} if variant in SERVES_HTTP else {}
    mount_readme_volumes(image_root, **http)
    assert not image_root.at(image_root.image.env["CONNECTOR_SECRET"]).exists()
    with CaptureTarget.in_thread() as target:
        container = start(image_root, target)
        try:
            port = container.wait_for_line(READY).group(1)
            if variant in SERVES_HTTP:
                assert get(f"http://127.0.0.1:{port}/healthz") == 200
                assert image_root.image.healthcheck is not None
                check = container.exec(image_root.image.healthcheck)
                assert check.returncode == 0, check.stdout + check.stderr
            else:
                wait_for_events(container, target, 1)
        finally:
            code = container.stop()
    assert code == 0, f"exit status {code} after SIGTERM:\n{container.output}"
    assert "Traceback" not in container.output, container.output


@pytest.mark.parametrize("variant", ["sink"])
def test_the_image_uses_secret_yml_when_it_is_mounted(image_root: ImageRoot, variant: str) -> None:
    token = "from-the-mounted-secret"
    mount_readme_volumes(image_root, host="127.0.0.1")
    secret = yaml.safe_dump({"auth_token": token}).encode()
    image_root.mount(image_root.image.env["CONNECTOR_SECRET"], secret)
    event = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/t", "ce-type": "t"}
    headers = {**event, "content-type": "application/json"}
    with CaptureTarget.in_thread() as target:
        container = start(image_root, target)
        try:
            url = f"http://127.0.0.1:{container.wait_for_line(READY).group(1)}/"
            anonymous = get(url, "POST", headers)
            allowed = get(url, "POST", {**headers, "authorization": f"Bearer {token}"})
        finally:
            code = container.stop()
    assert (anonymous, allowed, code) == (401, 200, 0), container.output


@pytest.mark.parametrize("variant", ["sink", "source-poll"])
def test_an_explicit_secret_path_that_does_not_exist_stays_an_error(
    image_root: ImageRoot, variant: str
) -> None:
    mount_readme_volumes(image_root)
    with CaptureTarget.in_thread() as target:
        container = start(image_root, target, "--secret", "/vanus-connect/secret/nope.yml")
        code = container.wait()
    assert code == 2, container.output
    assert "secret file not found" in container.output and "Traceback" not in container.output


@pytest.mark.parametrize("variant", ["source-poll"])
def test_a_polling_source_keeps_its_positions_on_the_state_volume(
    image_root: ImageRoot, variant: str
) -> None:
    """``position_store: positions.db`` (the README's advice) lands on the mounted volume."""
    state = image_root.image.workdir
    assert state in image_root.image.chowned, "the working directory is not the user's"
    assert (f"{image_root.run.image.split(':')[0]}-state", state) in image_root.run.mounts
    mount_readme_volumes(image_root, position_store="positions.db", interval=0.01)
    first_ids = []
    for _ in range(2):
        with CaptureTarget.in_thread() as target:
            container = start(image_root, target)
            try:
                wait_for_events(container, target, 3)
            finally:
                code = container.stop()
        assert code == 0, container.output
        first_ids.append(target.events[0].get_id())
    store = image_root.at(state) / "positions.db"
    assert store.is_file(), f"no positions.db in the state directory:\n{container.output}"
    if image_root.uid is not None:
        assert store.stat().st_uid == image_root.uid
    assert first_ids[0] != first_ids[1], "the second container started again from the start"


# --- The image itself, built by a container engine and run ------------------------------
#
# Each variant's Dockerfile is built for real when an engine answers and the FROM image is
# present (.ci/engine provides both on a fresh machine); otherwise these tests skip,
# naming why. Containers share the host's network, so a capture target on loopback
# receives what a source delivers.

UNIQUE = f"{os.getpid()}-{int(time.time())}"


@pytest.fixture(scope="session")
def image_builds() -> Iterator[dict[str, tuple[str, str]]]:
    """variant -> (image tag, build log), each variant built at most once per session."""
    builds: dict[str, tuple[str, str]] = {}
    yield builds
    for tag, _ in builds.values():
        subprocess.run(["docker", "rmi", "--force", tag], capture_output=True, check=False)


@pytest.fixture
def built(
    rendered: dict[str, Path], variant: str, image_builds: dict[str, tuple[str, str]]
) -> tuple[str, str]:
    """The image of ``variant`` (tag, build log); skips when no engine can build it."""
    if variant not in image_builds:
        project = rendered[variant]
        missing = engine_missing((project / "Dockerfile").read_text(encoding="utf-8"))
        if missing:
            pytest.skip(missing)
        tag = f"{project.name}:test-{variant}-{UNIQUE}"
        image_builds[variant] = (tag, build_image(project, tag))
    return image_builds[variant]


@pytest.fixture
def volumes() -> Iterator[list[str]]:
    """Named volumes a test creates (by naming them in ``docker run``); removed after."""
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run(
            ["docker", "volume", "rm", "--force", name], capture_output=True, check=False
        )


def run_built(
    project: Path,
    tag: str,
    tmp_path: Path,
    target: CaptureTarget,
    volumes: list[str],
    options: tuple[str, ...] = (),
    **config: object,
) -> EngineContainer:
    """The README's ``docker run`` of the built image: read-only, on the host's network.

    config.yml (the project's, with ``config`` over it) is the only file mounted; a
    named volume of the README gets a fresh name (kept in ``volumes``), as does the port.
    """
    image = parse_dockerfile((project / "Dockerfile").read_text(encoding="utf-8"))
    run = parse_docker_run((project / "README.md").read_text(encoding="utf-8"))
    base = yaml.safe_load((project / "config.yml").read_text("utf-8")) or {}
    config_file = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yml"
    config_file.write_text(yaml.safe_dump({**base, **config}, sort_keys=False), "utf-8")
    config_file.chmod(0o644)
    args = ["--network", "host", "--read-only", *options]
    for source, container_path in run.mounts:
        if source.endswith("/config.yml"):
            args += ["-v", f"{config_file}:{container_path}:ro"]
        else:
            if not volumes:
                volumes.append(f"{source}-{UNIQUE}-{len(volumes)}")
            args += ["-v", f"{volumes[0]}:{container_path}"]
    env = dict(run.env)
    if "CONNECTOR_PORT" in {**image.env, **env}:
        env["CONNECTOR_PORT"] = str(free_port())
    if "CONNECTOR_TARGET" in env:
        env["CONNECTOR_TARGET"] = target.url
    for name, value in env.items():
        args += ["-e", f"{name}={value}"]
    return EngineContainer(tag, args)


def stopped(container: EngineContainer) -> int:
    try:
        return container.stop()
    finally:
        container.remove()


def volume_path(name: str) -> Path:
    return Path(docker("volume", "inspect", "--format", "{{.Mountpoint}}", name))


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_built_image_runs_read_only_as_its_user(
    rendered: dict[str, Path],
    variant: str,
    built: tuple[str, str],
    tmp_path: Path,
    volumes: list[str],
) -> None:
    project, (tag, _) = rendered[variant], built
    image = parse_dockerfile((project / "Dockerfile").read_text(encoding="utf-8"))
    config: dict[str, object] = {"host": "127.0.0.1"} if variant in SERVES_HTTP else {}
    if variant == "source-poll":
        config.update(position_store="positions.db", interval=0.01)
    first_ids = []
    for _ in range(2 if variant == "source-poll" else 1):
        with CaptureTarget.in_thread() as target:
            container = run_built(project, tag, tmp_path, target, volumes, **config)
            try:
                port = container.wait_for_line(READY).group(1)
                assert container.process_ids()[0] == int(image.user), "not the image's user"
                if variant in SERVES_HTTP:
                    assert get(f"http://127.0.0.1:{port}/healthz") == 200
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as answer:
                        metrics = answer.read().decode()
                    assert re.search(r'cdk_connector_info\{.*[{,]version="0.1.0"', metrics), metrics
                    assert image.healthcheck is not None
                    healthy = container.exec(image.healthcheck)
                    assert (healthy.returncode, healthy.stdout + healthy.stderr) == (0, "")
                    # What `docker inspect` shows of a failing check: one line, no traceback.
                    sick = container.exec(image.healthcheck, "-e", "CONNECTOR_PORT=1")
                    assert sick.returncode != 0
                    assert "Traceback" not in sick.stdout + sick.stderr, sick.stderr
                else:
                    wait_for_events(container, target, 3)
                    first_ids.append(target.events[0].get_id())
            finally:
                code = stopped(container)
        assert code == 0, f"exit status {code} after SIGTERM:\n{container.output}"
        assert "Traceback" not in container.output, container.output
    if variant == "source-poll":
        store = volume_path(volumes[0]) / "positions.db"
        assert store.is_file(), "no positions.db on the state volume"
        assert store.stat().st_uid == int(image.user)
        assert first_ids[0] != first_ids[1], "the second container started again from the start"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["source-poll"])
def test_the_built_image_runs_as_an_arbitrary_user_of_group_0(
    rendered: dict[str, Path],
    variant: str,
    built: tuple[str, str],
    tmp_path: Path,
    volumes: list[str],
) -> None:
    """OpenShift's way: a uid the image does not know, in group 0; the state directory
    must still take the positions."""
    uid = 1000770000
    with CaptureTarget.in_thread() as target:
        container = run_built(
            rendered[variant],
            built[0],
            tmp_path,
            target,
            volumes,
            ("--user", f"{uid}:0"),
            position_store="positions.db",
            interval=0.01,
        )
        try:
            wait_for_events(container, target, 2)
            assert container.process_ids() == (uid, 0)
        finally:
            code = stopped(container)
    assert code == 0, f"exit status {code} after SIGTERM:\n{container.output}"
    assert (volume_path(volumes[0]) / "positions.db").stat().st_uid == uid


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_image_builds_without_warnings(variant: str, built: tuple[str, str]) -> None:
    log = built[1]
    for warning in ("Running pip as the 'root' user", "useradd warning", "groupadd warning"):
        assert warning not in log, f"{warning!r} in the build log:\n{log}"


def pinned(project: Path) -> set[str]:
    """``name==version`` of each pin in constraints.txt, names normalised."""
    lines = (project / "constraints.txt").read_text(encoding="utf-8").splitlines()
    return {normal_pin(line) for line in lines if line and not line.startswith("#")}


def normal_pin(line: str) -> str:
    name, _, version = line.partition("==")
    return f"{canonicalize_name(name)}=={version}"


def installed(tag: str) -> set[str]:
    freeze = docker("run", "--rm", "--network", "none", tag, "python", "-m", "pip", "freeze")
    return {normal_pin(line) for line in freeze.splitlines() if line}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_image_installs_the_pinned_versions(
    rendered: dict[str, Path], variant: str, built: tuple[str, str]
) -> None:
    unpinned = installed(built[0]) - pinned(rendered[variant])
    assert not unpinned, f"installed, but not as constraints.txt pins them: {sorted(unpinned)}"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sink"])
def test_the_otel_extra_is_a_build_argument(
    rendered: dict[str, Path], variant: str, built: tuple[str, str]
) -> None:
    project = rendered[variant]
    tag = f"{built[0]}-otel"
    try:
        build_image(project, tag, "EXTRAS=otel")
        packages = installed(tag)
    finally:
        subprocess.run(["docker", "rmi", "--force", tag], capture_output=True, check=False)
    names = {pin.partition("==")[0] for pin in packages}
    assert {"opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"} <= names
    assert packages <= pinned(project)
    assert "opentelemetry-sdk" not in {p.partition("==")[0] for p in installed(built[0])}
