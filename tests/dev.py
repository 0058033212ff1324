"""Developer entry point: one command each for the demo, the test suite and the benchmarks.

    python3 tests/dev.py demo     scaffold a source and a sink, run them together, show events
    python3 tests/dev.py test     the whole test suite (what CI runs); extra args go to pytest
    python3 tests/dev.py bench    the benchmarks (codec, delivery, sink receiver, store)
    python3 tests/dev.py bench --against REF [--rounds N] [--quick] [--only codec,delivery,sink]
                                  the codec, delivery and sink benchmarks for this working
                                  tree's kit and REF's (a commit, tag or branch), interleaved
                                  in one run: each figure's ratio new/old and its spread
    python3 tests/dev.py bench --latency [--seconds 20] [--quick]
                                  a source and a sink as processes at a steady 1,000 events/s:
                                  latency percentiles, CPU per 1,000 events, peak RSS

It needs only Python 3.10+, pip and git: the first run creates ``.venv/`` beside this
repository and installs ``tests/requirements.txt`` into it; later runs reuse it and
reinstall only when that file changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"
REQUIREMENTS = REPO / "tests" / "requirements.txt"
STAMP = VENV / ".requirements.sha256"
BENCHMARKS = (
    "bench_codec.py",
    "bench_delivery.py",
    "bench_sink.py",
    "bench_burst.py",
    "bench_store.py",
    "bench_tracing.py",
)


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv() -> Path:
    """Create or refresh the virtual environment; return its interpreter."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    python = venv_python()
    if python.exists() and STAMP.exists() and STAMP.read_text().strip() == digest:
        return python
    if not python.exists():
        print(f"creating {VENV.relative_to(REPO)}/ ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print(f"installing {REQUIREMENTS.relative_to(REPO)} ...", flush=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-r", str(REQUIREMENTS)], check=True)
    STAMP.write_text(digest + "\n")
    return python


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command not in ("demo", "test", "bench"):
        print(__doc__)
        return 0 if command in ("help", "-h", "--help") else 2
    python = str(ensure_venv())
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    if command == "demo":
        script = REPO / "tests" / "e2e" / "demo.py"
        return subprocess.run([python, str(script), *rest], cwd=REPO, env=env).returncode
    if command == "test":
        args = [python, "-m", "pytest", "tests", "-ra", "--timeout=600", *rest]
        return subprocess.run(args, cwd=REPO, env=env).returncode
    if any(arg.split("=", 1)[0] == "--against" for arg in rest):
        script = REPO / "tests" / "benchmarks" / "against.py"
        return subprocess.run([python, str(script), *rest], cwd=REPO, env=env).returncode
    if "--latency" in rest:
        script = REPO / "tests" / "benchmarks" / "bench_latency.py"
        rest = [arg for arg in rest if arg != "--latency"]
        return subprocess.run([python, str(script), *rest], cwd=REPO, env=env).returncode
    status = 0
    for name in BENCHMARKS:
        print(f"\n=== {name} ===", flush=True)
        script = REPO / "tests" / "benchmarks" / name
        status |= subprocess.run([python, str(script), *rest], cwd=REPO, env=env).returncode
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
