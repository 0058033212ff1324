"""The connector's own code: its configuration and its {{ cookiecutter.connector_type }}.

Connector: {{ cookiecutter.connector_name }}.
"""
