"""Fixtures of the template's own tests: rendered projects and the tools that check them."""

from __future__ import annotations

from pathlib import Path

import pytest
from template_support import (
    REPO,
    VARIANT_LICENSE,
    VARIANTS,
    declared_requirements,
    ensure_venv,
    render,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: builds a virtual environment or clones the template (-m 'not slow')"
    )


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One project per variant, rendered once per session with the default answers."""
    root = tmp_path_factory.mktemp("rendered")
    return {
        variant: render(root / variant, **answers, license=VARIANT_LICENSE[variant])
        for variant, answers in VARIANTS.items()
    }


@pytest.fixture(scope="session")
def generated_venv(rendered: dict[str, Path]) -> Path:
    """A virtual environment holding only what a generated project declares (+ test extras).

    Built once and cached under .venv-generated/<hash of the dependency list>, so a
    later session reuses it until pyproject.toml's dependencies change.
    """
    requirements = declared_requirements(next(iter(rendered.values())) / "pyproject.toml")
    return ensure_venv(REPO / ".venv-generated", requirements)
