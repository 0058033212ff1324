"""The webhook source's contract tests, from the cdk's standard suite (``cdk.testing.SourceTests``).

They serve the connector in-process and as ``python cmd/main.py`` on 127.0.0.1 with a
real HTTP target, and check what any webhook source must do whatever ``make_event``
does: a POST yields valid CloudEvents at the target and a 2xx, a failed delivery
answers an error status, a bad config exits 2. Override ``webhook_request()`` to send
the body and headers ``make_event`` expects; add your own tests as plain pytest
functions in other ``test_*.py`` files.

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

    config: ClassVar[Mapping[str, Any]] = {"username": "tests"}
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
