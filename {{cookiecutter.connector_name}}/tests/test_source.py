"""The source's contract tests, from the cdk's standard suite (``cdk.testing.SourceTests``).

They run the connector in-process and as ``python cmd/main.py`` against a real HTTP
target on 127.0.0.1, and check what any source must do whatever ``make_event`` does:
valid CloudEvents with unique ids reach the target, callbacks fire, a bad config exits 2.
Add your own tests as plain pytest functions in other ``test_*.py`` files.

A source that talks to a system (a database, an API) is tested against a local instance
that a pytest fixture starts on a free port (its address in ``config``; CI runs one
with the commented-out ``services:`` block of .github/workflows/ci.yml), or with a
stand-in object handed to it by overriding ``make_source()``. README.md, "Testing a
source that talks to a system", shows both.

The tests never read config.yml, so they never reach the systems it names: settings
they need go in a tests/config.yml or in ``config``, which wins (``secret`` holds what
secret.yml would), as class variables of the class below::

    from collections.abc import Mapping
    from typing import Any, ClassVar

    config: ClassVar[Mapping[str, Any]] = {"interval": 0.01}
"""

from __future__ import annotations

from pathlib import Path

from cdk.testing import SourceTests
from internal.config import Config
from internal.source import {{ cookiecutter.__class_prefix }}Source


class Test{{ cookiecutter.__class_prefix }}Source(SourceTests):
    source_class = {{ cookiecutter.__class_prefix }}Source
    config_class = Config
    project_dir = Path(__file__).resolve().parent.parent
