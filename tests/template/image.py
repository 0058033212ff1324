"""Run a generated connector the way its image would, without a container engine.

:func:`parse_dockerfile` reads the instructions the run depends on (``ENV``,
``WORKDIR``, ``COPY``, ``RUN chown``, ``USER``, ``CMD``, ``HEALTHCHECK``), and
:func:`parse_docker_run` the README's ``docker run`` line (``-v``, ``-e``).
:class:`ImageRoot` lays out a directory standing for the image's root file system: the
``COPY`` sources (less what ``.dockerignore`` leaves out) at their destinations, the
``WORKDIR`` and ``chown``-ed directories, and the README's mounts. Absolute paths of
the image become paths under that directory; a process started by :meth:`ImageRoot.start`
runs the ``CMD`` there, in the last ``WORKDIR``, with the image's environment, as the
``USER`` (uid 10001 when the tests run as root; otherwise the root directory's files are
made read-only to stand for files the user does not own).

Only what has no meaning outside a container differs: there is no network namespace, so
a test replaces the values that name ports and URLs (``CONNECTOR_PORT``, the target),
and the interpreter is one that holds the project's dependencies.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from output_lines import OutputLines

#: What the ``python:<version>-slim`` base image sets before the Dockerfile's own ENV.
BASE_ENV = {"PATH": "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


@dataclass
class Dockerfile:
    """The parts of a Dockerfile that decide how its container runs."""

    env: dict[str, str] = field(default_factory=dict)
    #: (sources relative to the build context, absolute destination), in order.
    copies: list[tuple[list[str], str]] = field(default_factory=list)
    #: Directories made by WORKDIR (absolute), in order; the last is the CMD's cwd.
    workdirs: list[str] = field(default_factory=list)
    #: Directories a ``RUN ... chown`` hands to a user: path -> "uid:gid".
    chowned: dict[str, str] = field(default_factory=dict)
    user: str = "0"
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] | None = None
    expose: list[int] = field(default_factory=list)

    @property
    def workdir(self) -> str:
        return self.workdirs[-1] if self.workdirs else "/"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuations joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines, too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        found.append((keyword.upper(), rest.strip()))
        pending = ""
    return found


def _absolute(path: str, cwd: str) -> str:
    return str(PurePosixPath(cwd) / path) if not path.startswith("/") else path


def parse_dockerfile(text: str) -> Dockerfile:
    image = Dockerfile()
    for keyword, args in instructions(text):
        if keyword == "ENV":
            for word in shlex.split(args):
                name, _, value = word.partition("=")
                image.env[name] = value
        elif keyword == "WORKDIR":
            image.workdirs.append(_absolute(args, image.workdir))
        elif keyword == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            destination = _absolute(words[-1], image.workdir)
            if words[-1].endswith("/"):
                destination += "/"
            image.copies.append((words[:-1], destination))
        elif keyword == "RUN":
            for owner, paths in re.findall(r"\bchown\s+(?:-R\s+)?(\S+)\s+([^&|;]+)", args):
                for path in shlex.split(paths):
                    image.chowned[_absolute(path, image.workdir)] = owner
        elif keyword == "USER":
            image.user = args
        elif keyword == "CMD":
            image.cmd = json.loads(args)
        elif keyword == "HEALTHCHECK":
            image.healthcheck = json.loads(args[args.index("CMD ") + 4 :])
        elif keyword == "EXPOSE":
            image.expose += [int(port.split("/")[0]) for port in args.split()]
    return image


@dataclass
class DockerRun:
    """The options of a ``docker run`` line that shape the container."""

    #: (host source, container path): a host path ("$PWD/x") or a named volume.
    mounts: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    image: str = ""


def parse_docker_run(readme: str) -> DockerRun:
    """The first ``docker run`` command of a README's ``sh`` blocks."""
    for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["docker", "run"]:
                return _docker_run(words[2:])
    raise AssertionError("the README has no docker run command")


def _docker_run(words: list[str]) -> DockerRun:
    run = DockerRun()
    takes_value = {"-v", "--volume", "-e", "--env", "-p", "--publish", "--network", "--name"}
    index = 0
    while index < len(words) and words[index].startswith("-"):
        option = words[index]
        value = words[index + 1] if option in takes_value else ""
        if option in ("-v", "--volume"):
            source, container = value.split(":")[:2]
            run.mounts.append((source, container))
        elif option in ("-e", "--env"):
            name, _, setting = value.partition("=")
            run.env[name] = setting
        index += 2 if option in takes_value else 1
    run.image = words[index]
    return run


def _ignored(context: Path) -> Callable[[str, list[str]], set[str]]:
    """shutil.copytree's ``ignore`` for the patterns of ``.dockerignore``."""
    path = context / ".dockerignore"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    patterns = [p.strip().removeprefix("**/") for p in lines if p.strip() and p[0] != "#"]

    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)}

    return ignore


def interpreter_for(uid: int | None) -> tuple[str, dict[str, str]]:
    """A Python holding this test run's packages that ``uid`` may run, and its extra env.

    This interpreter may live where another user cannot read it (a pyenv under /root);
    then the system's Python of the same version runs with these site-packages.
    """
    if uid is None or _runs_as(uid, sys.executable, {}):
        return sys.executable, {}
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = sysconfig.get_paths()
    extra = {"PYTHONPATH": os.pathsep.join(dict.fromkeys([paths["purelib"], paths["platlib"]]))}
    for candidate in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        if Path(candidate).exists() and _runs_as(uid, candidate, extra):
            return candidate, extra
    raise AssertionError(f"no Python {version} with this run's packages can run as uid {uid}")


def _runs_as(uid: int, python: str, env: Mapping[str, str]) -> bool:
    probe = "import pydantic, yaml, orjson, httptools"
    try:
        result = subprocess.run(
            [python, "-c", probe],
            user=uid,
            group=uid,
            extra_groups=[],
            env={**BASE_ENV, **env},
            cwd="/",
            capture_output=True,
            timeout=60,
            check=False,
        )
    except OSError:
        return False
    return result.returncode == 0


class ImageRoot:
    """A directory standing for the image's root file system, with the README's mounts."""

    def __init__(self, project: Path, image: Dockerfile, run: DockerRun) -> None:
        self.project = project
        self.image = image
        self.run = run
        # Not under pytest's tmp_path: its parents are private to the user running
        # the tests, and the connector may run as another one.
        self.path = Path(tempfile.mkdtemp(prefix="image-root-"))
        self.path.chmod(0o755)
        uid = int(image.user.split(":")[0])
        self.uid = uid if os.geteuid() == 0 and uid != 0 else None
        self._build()

    def at(self, image_path: str) -> Path:
        """Where a path of the image lies under this root."""
        return self.path / image_path.lstrip("/")

    def _build(self) -> None:
        ignore = _ignored(self.project)
        for workdir in self.image.workdirs:
            self.at(workdir).mkdir(parents=True, exist_ok=True)
        for sources, destination in self.image.copies:
            for source in sources:
                origin = self.project / source
                target = self.at(destination)
                if origin.is_dir():
                    shutil.copytree(origin, target, ignore=ignore, dirs_exist_ok=True)
                else:
                    directory = target if destination.endswith("/") else target.parent
                    directory.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, directory / origin.name if target == directory else target)
        if self.uid is None:
            # Not root: what the image's root owns becomes read-only instead.
            for path in sorted(self.path.rglob("*"), reverse=True):
                path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        for directory, owner in self.image.chowned.items():
            self._hand_over(self.at(directory), owner)

    def _hand_over(self, path: Path, owner: str) -> None:
        """Make ``path`` a directory the image's user owns."""
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
        if self.uid is not None:
            uid, _, gid = owner.partition(":")
            os.chown(path, int(uid), int(gid or uid))

    def mount(self, container_path: str, content: bytes | None = None) -> Path:
        """Mount a file with ``content`` at ``container_path`` (``None``: a named volume).

        A named volume starts as a copy of the image's directory, owner included, as
        Docker fills a new named volume.
        """
        target = self.at(container_path)
        parent = target if content is None else target.parent
        if not parent.exists():
            parent.mkdir(parents=True)
            parent.chmod(0o755)
        if content is None:
            owner = self.image.chowned.get(container_path)
            if owner is not None:
                self._hand_over(target, owner)
        else:
            target.write_bytes(content)
            target.chmod(0o444)
        return target

    def environment(self, python_env: Mapping[str, str], **overrides: str) -> dict[str, str]:
        """The container's environment: base image, ENV, ``-e``, then ``overrides``.

        A value that is an absolute path of the image is mapped under this root.
        """
        env = {**self.image.env, **self.run.env}
        env = {k: str(self.at(v)) if v.startswith("/") else v for k, v in env.items()}
        return {**BASE_ENV, **env, **python_env, **overrides}

    def command(self, words: list[str], python: str) -> list[str]:
        """``words`` (a CMD) with ``python`` for the image's and absolute paths mapped."""
        mapped = [python if words[0] == "python" else words[0]]
        return mapped + [str(self.at(w)) if w.startswith("/") else w for w in words[1:]]

    def popen_args(self) -> dict[str, Any]:
        """How to start a process as the image's user, in its last WORKDIR."""
        args: dict[str, Any] = {"cwd": self.at(self.image.workdir)}
        if self.uid is not None:
            args.update(user=self.uid, group=self.uid, extra_groups=[])
        return args

    def remove(self) -> None:
        for path in self.path.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(self.path, ignore_errors=True)


class _Lines:
    """A process whose output (stdout and stderr) is read line by line as it comes."""

    def _read(self, words: list[str], **popen: Any) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            words,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **popen,
        )
        assert process.stdout is not None
        self._output = OutputLines(process.stdout)
        return process

    @property
    def output(self) -> str:
        return self._output.text

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        return self._output.wait_for(pattern, timeout)


class Container(_Lines):
    """The image's CMD running under an :class:`ImageRoot`; output gathered line by line."""

    def __init__(
        self, root: ImageRoot, env: dict[str, str], python: str, args: list[str] | None = None
    ) -> None:
        self.root = root
        self.env = env
        self.python = python
        command = root.command([*root.image.cmd, *(args or [])], python)
        self.process = self._read(command, env=env, **root.popen_args())

    def exec(self, words: list[str]) -> subprocess.CompletedProcess[str]:
        """Run ``words`` (the HEALTHCHECK, say) in the container, beside its process."""
        return subprocess.run(
            self.root.command(words, self.python),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            **self.root.popen_args(),
        )

    def wait(self, timeout: float = 30.0) -> int:
        """The exit status of a process that ends by itself (a bad config, say)."""
        code = self.process.wait(timeout)
        self._output.join(10)
        return code

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as ``docker stop`` sends; the exit status (killed after ``timeout``)."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(10)
        self._output.join(10)
        return code


# --- The image itself, built and run by a container engine ------------------------------


def engine_missing(dockerfile: str) -> str | None:
    """Why the image of ``dockerfile`` cannot be built here, or None when it can.

    No image registry may be reachable, so the ``FROM`` image must be present already
    (``.ci/engine`` makes ``python:3.11-slim`` from Debian packages).
    """
    if shutil.which("docker") is None:
        return "no container engine: no docker command (.ci/engine installs one as root)"
    try:
        info = _docker("info", "--format", "{{.ServerVersion}}", timeout=20)
    except subprocess.TimeoutExpired:
        return "no container engine: `docker info` did not answer within 20 s"
    if info.returncode != 0:
        first = (info.stderr.strip().splitlines() or ["no message"])[0]
        return f"no container engine: `docker info` failed: {first}"
    base = next(args for keyword, args in instructions(dockerfile) if keyword == "FROM")
    if _docker("image", "inspect", base).returncode != 0:
        return f"no base image {base} for the Dockerfile's FROM (.ci/engine makes one)"
    return None


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def docker(*args: str, timeout: float = 120) -> str:
    """``docker args``' output; fails the test, with docker's message, on an error."""
    done = _docker(*args, timeout=timeout)
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout.strip()


def build_image(project: Path, tag: str, *build_args: str) -> str:
    """Build ``project``'s Dockerfile as ``tag``; the build's log.

    The build shares the host's network: pip in a ``RUN`` reaches the package index as
    pip on this machine does.
    """
    args = [f"--build-arg={arg}" for arg in build_args]
    done = subprocess.run(
        ["docker", "build", "--network", "host", "--force-rm", "-t", tag, *args, str(project)],
        # The classic builder: BuildKit would fetch the `# syntax=` frontend image from a
        # registry, and none is reachable.
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"docker build {project.name} failed:\n{log}"
    return log


class EngineContainer(_Lines):
    """A container of a built image (``docker run -d``); its log read line by line."""

    def __init__(self, image: str, options: list[str], args: list[str] | None = None) -> None:
        self.id = docker("run", "-d", *options, image, *(args or []))
        self._logs = self._read(["docker", "logs", "--follow", self.id])

    def inspect(self, template: str) -> str:
        return docker("inspect", "--format", template, self.id)

    def process_ids(self) -> tuple[int, int]:
        """(uid, gid) of the container's main process, read from the host's /proc."""
        status = Path(f"/proc/{self.inspect('{{.State.Pid}}')}/status").read_text("utf-8")
        ids = {k: v.split()[0] for k, _, v in (ln.partition(":\t") for ln in status.splitlines())}
        return int(ids["Uid"]), int(ids["Gid"])

    def exec(self, words: list[str], *options: str) -> subprocess.CompletedProcess[str]:
        """Run ``words`` (the HEALTHCHECK, say) in the container, beside its process."""
        return _docker("exec", *options, self.id, *words, timeout=60)

    def wait(self, timeout: float = 60.0) -> int:
        """The exit status of a container that ends by itself."""
        code = int(docker("wait", self.id, timeout=timeout))
        self._output.join(10)
        return code

    def stop(self, grace: int = 20) -> int:
        """``docker stop`` (SIGTERM, SIGKILL after ``grace`` seconds); the exit status."""
        docker("stop", "--time", str(grace), self.id, timeout=grace + 30)
        return self.wait()

    def remove(self) -> None:
        _docker("rm", "--force", self.id)
        if self._logs.poll() is None:
            self._logs.kill()
        self._logs.wait(10)
