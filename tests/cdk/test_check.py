"""``--check``: the connector's own ``check()`` and, for a source, whether its target answers.

Real processes: each test runs a connector script with ``--check`` against a live target
(a plain HTTP server on loopback) or a dead one (a port nobody listens on).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from processes import Target, run

from cdk.testing.target import free_port

CHECKED_SOURCE = """
import asyncio
import cdk


class Config(cdk.SourceConfig):
    answer: str = "nothing"  # what check() does: nothing, pass, fail, raise


class Checked(cdk.Source[Config]):
    def initialize(self, config):
        raise RuntimeError("--check must not initialize")

    def make_event(self):
        raise RuntimeError("--check must not make events")

    def answer(self):
        if self.config.answer == "raise":
            raise ConnectionError("database refused the credentials")
        if self.config.answer == "leak":
            token = self.config.target_auth_token.get_secret_value()
            raise PermissionError(f"token {token} refused")
        return {"nothing": None, "pass": True, "fail": False}[self.config.answer]
{check}

if __name__ == "__main__":
    cdk.run_source(Config, Checked)
"""
CHECKS = {
    "sync": "\n    def check(self):\n        return self.answer()\n",
    "async": (
        "\n    async def check(self):\n        await asyncio.sleep(0)\n"
        "        return self.answer()\n"
    ),
    "none": "",
}

CHECKED_SINK = """
import cdk


class Config(cdk.SinkConfig):
    healthy: bool = True


class Checked(cdk.Sink[Config]):
    def check(self):
        return self.config.healthy

    def arrived(self, *events):
        return cdk.SUCCESS


if __name__ == "__main__":
    cdk.run_sink(Config, Checked)
"""


def script(style: str) -> str:
    return CHECKED_SOURCE.replace("{check}", CHECKS[style])


def check(tmp_path: Path, code: str, config: str) -> tuple[int, dict[str, str], str]:
    (tmp_path / "config.yml").write_text(config, encoding="utf-8")
    result = run(tmp_path, code, "--check")
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"not one line on stdout: {result.stdout!r}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(lines[0]), result.stderr


def dead_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    port = free_port()
    with socket.socket() as probe:  # the port is free now; make sure of it
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    return f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize("style", ["sync", "async", "none"])
def test_ok_when_check_agrees_and_the_target_answers(
    tmp_path: Path, target: Target, style: str
) -> None:
    answer = "pass" if style != "none" else "nothing"
    code, outcome, _ = check(tmp_path, script(style), f"target: {target.url}\nanswer: {answer}\n")
    assert (code, outcome) == (0, {"status": "ok"})
    assert target.requests == [], "the check delivered something"


@pytest.mark.parametrize("style", ["sync", "async"])
def test_a_check_that_raises_fails_with_its_message(
    tmp_path: Path, target: Target, style: str
) -> None:
    code, outcome, _ = check(tmp_path, script(style), f"target: {target.url}\nanswer: raise\n")
    assert code == 1
    assert outcome == {
        "status": "failed",
        "part": "check",
        "message": "ConnectionError: database refused the credentials",
    }


def test_a_check_that_returns_false_fails(tmp_path: Path, target: Target) -> None:
    code, outcome, _ = check(tmp_path, script("async"), f"target: {target.url}\nanswer: fail\n")
    assert (code, outcome["status"], outcome["part"]) == (1, "failed", "check")


def test_a_dead_target_fails_naming_it(tmp_path: Path) -> None:
    url = dead_url()
    code, outcome, _ = check(tmp_path, script("sync"), f"target: {url}\nanswer: pass\n")
    assert (code, outcome["status"], outcome["part"]) == (1, "failed", "target")
    assert outcome["message"].startswith(url) and "refused" in outcome["message"].lower()


def test_a_dead_dead_letter_target_fails_naming_it(tmp_path: Path, target: Target) -> None:
    config = f"target: {target.url}\ndead_letter_target: {dead_url()}\n"
    code, outcome, _ = check(tmp_path, script("none"), config)
    assert (code, outcome["part"]) == (1, "dead_letter_target")


def test_a_sink_runs_its_check_only(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text("port: 0\nhealthy: false\n", encoding="utf-8")
    result = run(tmp_path, CHECKED_SINK, "--check")
    assert result.returncode == 1
    assert json.loads(result.stdout)["part"] == "check"
    (tmp_path / "config.yml").write_text("port: 0\nhealthy: true\n", encoding="utf-8")
    result = run(tmp_path, CHECKED_SINK, "--check")
    assert (result.returncode, json.loads(result.stdout)) == (0, {"status": "ok"})


def test_a_secret_in_the_message_is_masked(tmp_path: Path, target: Target) -> None:
    token = "tok-5ecret-check-91"
    config = f"target: {target.url}\ntarget_auth_token: {token}\nanswer: leak\n"
    code, outcome, errors = check(tmp_path, script("sync"), config)
    assert (code, outcome["part"]) == (1, "check")
    assert outcome["message"] == "PermissionError: token ********** refused"
    assert token not in errors


def test_credentials_in_a_dead_target_s_url_are_masked(tmp_path: Path) -> None:
    url = dead_url().replace("http://", "http://user:pw-5ecret-77@")
    code, outcome, _ = check(tmp_path, script("none"), f"target: {url}\n")
    assert (code, outcome["part"]) == (1, "target")
    assert "pw-5ecret-77" not in outcome["message"] and "user:**********@" in outcome["message"]


def test_help_names_the_flag(tmp_path: Path) -> None:
    result = run(tmp_path, CHECKED_SINK, "--help")
    assert result.returncode == 0 and "--check " in result.stdout and "check()" in result.stdout
