"""Shared test setup: makes the template's vendored ``cdk`` importable in place."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Importing cdk from the template must not leave __pycache__ inside the template,
# where cookiecutter would copy it into every generated project.
sys.dont_write_bytecode = True

REPO = Path(__file__).resolve().parent.parent
TEMPLATE_PROJECT = REPO / "{{cookiecutter.connector_name}}"

if str(TEMPLATE_PROJECT) not in sys.path:
    sys.path.insert(0, str(TEMPLATE_PROJECT))

# Real etcd servers for the tests that need one (etcd_support.py says how to use them).
from etcd_support import etcd, etcd_cluster, etcd_url  # noqa: E402, F401

# A real Redis server for the sink's shared dedupe store (redis_support.py).
from redis_support import redis_server  # noqa: E402, F401


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: builds virtual environments or runs cruft (deselect: -m 'not slow')"
    )
