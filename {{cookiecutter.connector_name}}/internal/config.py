{%- set base = "SinkConfig" if cookiecutter.connector_type == "sink" else ("WebhookSourceConfig" if cookiecutter.source_style == "webhook" else "SourceConfig") -%}
"""The connector's configuration: the kit's keys plus this connector's own.

Each field is a key of config.yml; secret.yml is merged over it, so keep ``password``
and ``secret`` there. Unknown keys are rejected, so a typo is reported, not ignored.
The configuration table in README.md is made from these fields (``tests/`` checks it).
"""

from pydantic import Field, SecretStr

import cdk


class Config(cdk.{{ base }}):
    """Configuration of {{ cookiecutter.connector_name }}."""

    # TODO: replace these example fields with what your connector needs.
    username: str | None = Field(None, description="User name for the external system.")
    password: SecretStr | None = Field(
        None, description="Password for the external system (keep it in secret.yml)."
    )
    secret: SecretStr | None = Field(
        None, description="Any other secret the connector needs (keep it in secret.yml)."
    )
