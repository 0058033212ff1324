"""``bench --against``'s plumbing: a ref's kit extracted from git, a benchmark run for a chosen
kit, and the report of two kits' figures (no timing is asserted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from against import extract_kit, report, run_one, speed_ratio
from benchkit import TEMPLATE_PROJECT

pytestmark = pytest.mark.timeout(120)


def test_a_refs_kit_is_extracted_and_a_benchmark_imports_the_kit_it_is_given(
    tmp_path: Path,
) -> None:
    kit, short = extract_kit("HEAD", tmp_path)
    assert (kit / "cdk" / "codec.py").is_file()
    assert kit != TEMPLATE_PROJECT and short
    # A kit whose codec cannot be imported gives an error, not figures: the run really
    # used the directory it was given.
    (kit / "cdk" / "codec.py").write_text("raise ImportError('not this codec')\n")
    broken = run_one(["bench_codec.py", "--json", "--quick"], kit, timeout=60)
    assert "not this codec" in broken["error"]
    working = run_one(["bench_codec.py", "--json", "--quick"], TEMPLATE_PROJECT, timeout=60)
    names = [figure["name"] for figure in working["figures"]]
    assert "codec: encode binary, per event" in names
    assert all(figure["value"] > 0 for figure in working["figures"])


def test_an_unknown_ref_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="is not a commit of this repository"):
        extract_kit("no-such-ref-anywhere", tmp_path)


def test_ratios_say_faster_above_one_for_rates_and_costs() -> None:
    assert speed_ratio(200.0, 100.0, "higher") == 2.0
    assert speed_ratio(50.0, 100.0, "lower") == 2.0


def figure(name: str, value: float, better: str = "lower") -> dict[str, Any]:
    return {"name": name, "value": value, "unit": "us", "better": better}


def test_report_compares_what_both_kits_gave_and_says_why_the_rest_is_missing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    new = {
        "figures": [figure("delivery: a, CPU/event", 9.0), figure("delivery: b, CPU/event", 5.0)],
        "skipped": [],
    }
    old = {
        "figures": [figure("delivery: a, CPU/event", 10.0)],
        "skipped": [{"name": "b", "why": "exit status 1: unknown setting batch_linger"}],
    }
    report({"delivery": {"new": [new, new], "old": [old, old]}}, "v1", [])
    out = capsys.readouterr().out
    compared = next(line for line in out.splitlines() if line.startswith("delivery: a"))
    assert "1.11x" in compared  # old cost / new cost
    assert "skipped delivery: b, CPU/event: v1's kit cannot run it: exit status 1" in out
    assert "no figure below 0.97x" in out
