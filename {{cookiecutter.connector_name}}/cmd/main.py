"""Entry point: ``python cmd/main.py [--config FILE] [--secret FILE]`` from the project root."""

import sys
from pathlib import Path

# Run as a script, so the project root (where cdk/ and internal/ live) is not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cdk
from internal.config import Config
{%- if cookiecutter.connector_type == "sink" %}
from internal.sink import {{ cookiecutter.__class_prefix }}Sink

if __name__ == "__main__":
    cdk.run_sink(Config, {{ cookiecutter.__class_prefix }}Sink)
{%- else %}
from internal.source import {{ cookiecutter.__class_prefix }}Source

if __name__ == "__main__":
    cdk.run_source(Config, {{ cookiecutter.__class_prefix }}Source)
{%- endif %}
