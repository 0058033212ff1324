"""The sink's contract tests, from the cdk's standard suite (``cdk.testing.SinkTests``).

They serve the connector in-process and as ``python cmd/main.py`` on 127.0.0.1 and
check what any sink must do whatever ``arrived`` does: binary, structured and batched
events reach ``arrived`` exactly as sent, invalid input gets 400, a failed ``Result``
becomes its HTTP status, a bad config exits 2. Override ``make_event(index)`` if
``arrived`` expects events of a particular shape; add your own tests as plain pytest
functions in other ``test_*.py`` files.

Settings the tests need go in ``config`` (merged over config.yml; ``secret`` holds what
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
