"""The sink's contract tests, from the cdk's standard suite (``cdk.testing.SinkTests``).

They serve the connector in-process and as ``python cmd/main.py`` on 127.0.0.1 and
check what any sink must do whatever ``arrived`` does: binary, structured and batched
events reach ``arrived`` exactly as sent, invalid input gets 400, a failed ``Result``
becomes its HTTP status, a bad config exits 2. Override ``make_event(index)`` if
``arrived`` expects events of a particular shape; add your own tests as plain pytest
functions in other ``test_*.py`` files.

A sink that talks to a system (a database, an API) is tested against a local instance
that a pytest fixture starts on a free port (its address in ``config``; CI runs one
with the commented-out ``services:`` block of .github/workflows/ci.yml), or with a
stand-in object handed to it by overriding ``make_sink()``. README.md, "Testing a
sink that talks to a system", shows both.

The tests never read config.yml, so they never reach the systems it names: settings
they need go in a tests/config.yml or in ``config``, which wins (``secret`` holds what
secret.yml would), as class variables of the class below::

    from collections.abc import Mapping
    from typing import Any, ClassVar

    config: ClassVar[Mapping[str, Any]] = {"username": "tests"}
"""

from __future__ import annotations

from pathlib import Path

from cdk.testing import SinkTests
from internal.config import Config
from internal.sink import {{ cookiecutter.__class_prefix }}Sink


class Test{{ cookiecutter.__class_prefix }}Sink(SinkTests):
    sink_class = {{ cookiecutter.__class_prefix }}Sink
    config_class = Config
    project_dir = Path(__file__).resolve().parent.parent
