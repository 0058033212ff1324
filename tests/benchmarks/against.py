"""Regressions caught in one run: the codec, delivery and sink benchmarks for this working
tree's kit and for the kit of a git ref, interleaved.

Run: ``python3 tests/dev.py bench --against REF [--rounds N] [--quick] [--only codec,sink]``

REF's ``{{cookiecutter.connector_name}}/cdk`` is extracted with ``git archive`` into a
temporary directory; each benchmark of this working tree then runs as a subprocess with
``$CDK_BENCH_KIT`` naming one kit or the other, both back to back, the order alternating
from round to round (new-old, old-new, ...) so that a change in the machine's load hits
both alike. For each figure it prints both values (medians over the rounds) and the
working tree's speed as a multiple of REF's (rates new/old, costs old/new: above 1 is
faster), with its median and spread (lowest-highest) over the rounds' ratios. A figure
REF's kit cannot produce (a setting it lacks) is skipped with a line saying why.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from benchkit import KIT_ENV, TEMPLATE_PROJECT

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KIT_PATH = f"{TEMPLATE_PROJECT.name}/cdk"
#: A figure whose ratio falls below this is listed at the end.
SLOWER = 0.97


def bench_commands(quick: bool) -> dict[str, list[str]]:
    """Benchmark name -> its command line (without the interpreter) for one kit, one round."""
    return {
        "codec": ["bench_codec.py", "--json", *(["--quick"] if quick else [])],
        "delivery": [
            "bench_delivery.py",
            "--json",
            "--rounds=1",
            f"--seconds={0.8 if quick else 1.5}",
            "--only=Deliverer",
        ],
        "sink": [
            "bench_sink.py",
            "--json",
            "--receivers=cdk",
            "--rounds=1",
            f"--seconds={1 if quick else 2}",
            "--warmup=1",
        ],
    }


def extract_kit(ref: str, into: Path) -> tuple[Path, str]:
    """REF's kit under ``into`` (the directory to put on ``sys.path``) and REF's short hash."""
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--short", f"{ref}^{{commit}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if found.returncode:
        raise SystemExit(f"bench --against: {ref!r} is not a commit of this repository")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "--", KIT_PATH], cwd=REPO, capture_output=True
    )
    if archive.returncode:
        why = archive.stderr.decode(errors="replace").strip()
        raise SystemExit(f"bench --against: {ref} has no {KIT_PATH} ({why})")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / TEMPLATE_PROJECT.name, found.stdout.strip()


def run_one(command: list[str], kit: Path, timeout: float) -> dict[str, Any]:
    """One benchmark run for ``kit``: its JSON, or ``{"error": why}``."""
    env = {**os.environ, KIT_ENV: str(kit), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        out = subprocess.run(
            [sys.executable, "-B", str(HERE / command[0]), *command[1:]],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:g} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        why = (out.stderr.strip().splitlines() or lines or ["no output"])[-1]
        return {"error": f"exit status {out.returncode}: {why}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def speed_ratio(new: float, old: float, better: str) -> float:
    """How many times faster the new figure is (above 1: better)."""
    if better == "higher":
        return new / old if old else float("inf")
    return old / new if new else float("inf")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--against", required=True, metavar="REF", help="a commit, tag or branch to compare with"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running both kits")
    parser.add_argument("--quick", action="store_true", help="shorter runs (about a third)")
    parser.add_argument("--only", help="comma-separated benchmarks: codec, delivery, sink")
    args = parser.parse_args(argv)
    commands = bench_commands(args.quick)
    if args.only:
        unknown = set(args.only.split(",")) - set(commands)
        if unknown:
            parser.error(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}")
        commands = {k: v for k, v in commands.items() if k in args.only.split(",")}
    notes: list[str] = []
    if "sink" in commands and shutil.which("wrk") is None:
        notes.append("sink: skipped, `wrk` is not installed (apt-get install -y wrk)")
        del commands["sink"]
    with tempfile.TemporaryDirectory(prefix="cdk-against-") as tmp:
        old_kit, short = extract_kit(args.against, Path(tmp))
        kits = {"new": TEMPLATE_PROJECT, "old": old_kit}
        print(
            f"working tree's kit (new) against {args.against} ({short}, old): {args.rounds} rounds "
            f"of {', '.join(commands)}, the order of the kits alternating; "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        # results[bench][kit] = one JSON result per round
        results: dict[str, dict[str, list[dict[str, Any]]]] = {
            bench: {"new": [], "old": []} for bench in commands
        }
        started = time.monotonic()
        for round_no in range(args.rounds):
            order = ["new", "old"] if round_no % 2 == 0 else ["old", "new"]
            for bench, command in commands.items():
                for which in order:
                    results[bench][which].append(run_one(command, kits[which], timeout=600))
            print(
                f"  round {round_no + 1} done after {time.monotonic() - started:.0f} s "
                f"(load average {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    report(results, args.against, notes)
    return 0


def why_not(name: str, skipped: list[tuple[str, str, str]], ref: str, missing: str = "") -> str:
    """Why a figure (or scenario) ``name`` is missing (from the ``missing`` kit), in words."""
    for which, skipped_name, why in skipped:
        if skipped_name in name:
            kit = "the working tree's kit" if which == "new" else f"{ref}'s kit"
            return f"{kit} cannot run it: {why}"
    kit = "the working tree's kit" if missing == "new" else f"{ref}'s kit"
    return f"{kit} gave no figure (see its failed runs above)"


def report(results: dict[str, dict[str, list[dict[str, Any]]]], ref: str, notes: list[str]) -> None:
    print()
    print(f"{'figure':<58} {'new':>10} {'old':>10} {'unit':<8} {'new vs old':>10} {'spread':>13}")
    slower: list[str] = []
    compared = 0
    for bench, by_kit in results.items():
        for which, runs in by_kit.items():
            for run in runs:
                if "error" in run:
                    notes.append(f"{bench}: a run of the {which} kit failed: {run['error']}")
        # name -> kit -> values per round (None where a round lacked it)
        values: dict[str, dict[str, list[float | None]]] = {}
        meta: dict[str, dict[str, Any]] = {}
        rounds = len(by_kit["new"])
        for which, runs in by_kit.items():
            for i, run in enumerate(runs):
                for figure in run.get("figures", []):
                    meta.setdefault(figure["name"], figure)
                    per = values.setdefault(
                        figure["name"], {"new": [None] * rounds, "old": [None] * rounds}
                    )
                    per[which][i] = figure["value"]
        skipped = [
            (which, s["name"], s["why"])
            for which, runs in by_kit.items()
            for run in runs
            for s in run.get("skipped", [])
        ]

        for name, per in values.items():
            pairs = [(n, o) for n, o in zip(per["new"], per["old"], strict=True) if n and o]
            if not pairs:
                missing = "old" if any(per["new"]) else "new"
                notes.append(f"skipped {name}: {why_not(name, skipped, ref, missing)}")
                continue
            compared += 1
            better = meta[name]["better"]
            ratios = sorted(speed_ratio(n, o, better) for n, o in pairs)
            median = statistics.median(ratios)
            new = statistics.median(n for n, _ in pairs)
            old = statistics.median(o for _, o in pairs)
            spread = f"{ratios[0]:.2f}-{ratios[-1]:.2f}x"
            print(
                f"{name:<58} {new:>10,.2f} {old:>10,.2f} {meta[name]['unit']:<8} "
                f"{median:>9.2f}x {spread:>13}"
            )
            if median < SLOWER:
                slower.append(f"{name} ({median:.2f}x)")
        for _, name, _ in skipped:
            if not any(name in figure for figure in values):
                notes.append(f"skipped {name}: {why_not(name, skipped, ref)}")
    print("\nnew vs old: the working tree's speed as a multiple of the old kit's (rates new/old,")
    print("costs old/new; above 1 is faster); spread: lowest-highest ratio over the rounds.")
    for note in dict.fromkeys(notes):
        print(note)
    if slower:
        print(f"below {SLOWER}x: " + "; ".join(slower))
    elif not compared:
        print("no figure could be compared")
    else:
        print(f"no figure below {SLOWER}x")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
