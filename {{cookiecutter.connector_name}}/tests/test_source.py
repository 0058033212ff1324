"""The source's contract tests, from the cdk's standard suite (``cdk.testing.SourceTests``).

They run the connector in-process and as ``python cmd/main.py`` against a real HTTP
target on 127.0.0.1, and check what any source must do whatever ``make_event`` does:
valid CloudEvents with unique ids reach the target, callbacks fire, a bad config exits 2.
Add your own tests as plain pytest functions in other ``test_*.py`` files.

Settings the tests need go in ``config`` (merged over config.yml; ``secret`` holds what
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
