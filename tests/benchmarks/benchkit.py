"""What the benchmarks share: which kit they measure, and their machine-readable output.

A benchmark measures the kit of this working tree unless ``$CDK_BENCH_KIT`` names another
directory holding a ``cdk/`` package (``against.py`` sets it to an older version's, extracted
from git, to time both in one run). With ``--json`` a benchmark prints, as its last line,
``{"figures": [...], "skipped": [...]}``: each figure a name, a value, its unit and whether
higher or lower is better; each skipped one a name and why (the other kit may lack a feature
that a scenario uses).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

KIT_ENV = "CDK_BENCH_KIT"
TEMPLATE_PROJECT = Path(__file__).resolve().parents[2] / "{{cookiecutter.connector_name}}"


def kit_dir() -> Path:
    """The directory whose ``cdk/`` package the benchmark imports."""
    return Path(os.environ.get(KIT_ENV) or TEMPLATE_PROJECT)


def use_kit() -> Path:
    """Put the chosen kit first on ``sys.path``; return its directory."""
    sys.dont_write_bytecode = True  # keep __pycache__ out of the template directory
    kit = kit_dir()
    if str(kit) not in sys.path:
        sys.path.insert(0, str(kit))
    return kit


@dataclass
class Figures:
    """A benchmark's results for ``--json``."""

    figures: list[dict[str, object]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, name: str, value: float, unit: str, better: str = "higher") -> None:
        assert better in ("higher", "lower")
        self.figures.append({"name": name, "value": value, "unit": unit, "better": better})

    def skip(self, name: str, why: str) -> None:
        self.skipped.append({"name": name, "why": " ".join(why.split())[:300]})

    def emit(self) -> None:
        print(json.dumps(asdict(self)), flush=True)
