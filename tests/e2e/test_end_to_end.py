"""End to end: render a source and a sink, run both as processes, check every event arrived.

Each run starts the rendered sink (``python cmd/main.py``) on a free loopback port and
the rendered polling source targeting it, in binary, structured and batched mode;
stops both with SIGTERM; and checks that every event the source reported delivered
was printed by the sink, that the sink received it in the configured mode, and that
both processes exited 0. The generated projects' own test suites run here too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from demo import render, run_pair

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("rendered")
    return {
        "source": render("source", out),
        "sink": render("sink", out),
        "webhook": render("source", out, connector_name="webhook-example", source_style="webhook"),
    }


@pytest.mark.parametrize(
    ("content_mode", "batch_size", "wire_mode"),
    [("binary", 1, "binary"), ("structured", 1, "structured"), ("binary", 5, "batch")],
    ids=["binary", "structured", "batch"],
)
def test_source_to_sink(
    projects: dict[str, Path], content_mode: str, batch_size: int, wire_mode: str
) -> None:
    run = run_pair(
        projects["source"],
        projects["sink"],
        content_mode=content_mode,
        batch_size=batch_size,
        interval=0.002,
        events=40,
        seconds=60,
        require_events=True,
    )
    report = f"{run.summary()}\n--- source\n{run.source_output}\n--- sink\n{run.sink_output}"
    assert run.source_status == 0, report
    assert run.sink_status == 0, report
    assert len(set(run.delivered)) >= 40, report
    assert run.failed == [], report
    assert run.missing == [], report
    assert len(run.arrived) == len(set(run.arrived)), "an event arrived twice:\n" + report
    # The sink's own metrics say which wire mode carried the events.
    assert run.received_by_mode.get(wire_mode, 0) >= len(set(run.delivered)), report
    assert set(run.received_by_mode) <= {wire_mode}, report
    assert "Traceback" not in run.source_output + run.sink_output, report


@pytest.mark.parametrize("variant", ["source", "sink", "webhook"])
def test_generated_tests_pass(projects: dict[str, Path], variant: str) -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=projects[variant],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout, result.stdout


def test_the_readme_shows_what_the_demo_prints() -> None:
    """The template README's demo excerpt: each line of it (times aside) is in the output."""
    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    start = readme.index("```\n[sink]")
    excerpt = readme[start + 4 : readme.index("```", start + 4)].splitlines()
    demo = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("demo.py"))],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr

    def plain(line: str) -> str:
        line = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "TIME", line)
        return re.sub(r"\(\d+(\.\d+)? s\)", "(SECONDS)", line)

    printed = {plain(line) for line in demo.stdout.splitlines()}
    missing = [line for line in excerpt if line != "..." and plain(line) not in printed]
    assert not missing, f"README lines the demo does not print: {missing}\n{demo.stdout}"
