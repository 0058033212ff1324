"""cdk: the connector-development kit vendored into every generated connector.

Public API (everything else is private and may change):

- ``CloudEvent``: the CloudEvents SDK event type handed to and taken from users.
- ``Source``, ``WebhookSource``, ``Sink``: the bases a connector subclasses.
- ``Tuple``, ``Result``, ``SUCCESS``: what a source queues and what a sink answers.
- ``SourceConfig``, ``SinkConfig``, ``WebhookSourceConfig``: config models to extend.
- ``Request``, ``HTTPError``: what a webhook source's ``make_event`` receives and raises.
- ``run_source``, ``run_sink``: the entry points ``cmd/main.py`` calls.
- ``PositionStore``, ``Checkpoint``: where a polling source keeps its position across
  restarts, advanced only past acknowledged events.
- ``ConfigError``, ``StoreError``: what a bad configuration or an unusable position
  store raises.
"""

from cloudevents.core.v1.event import CloudEvent

from cdk.config import ConfigError, SinkConfig, SourceConfig, WebhookSourceConfig
from cdk.connector import SUCCESS, Result, Sink, Source, Tuple, WebhookSource
from cdk.http import HTTPError, Request
from cdk.runtime import run_sink, run_source
from cdk.store import Checkpoint, PositionStore, StoreError

__all__ = [
    "SUCCESS",
    "Checkpoint",
    "CloudEvent",
    "ConfigError",
    "HTTPError",
    "PositionStore",
    "Request",
    "Result",
    "Sink",
    "SinkConfig",
    "Source",
    "SourceConfig",
    "StoreError",
    "Tuple",
    "WebhookSource",
    "WebhookSourceConfig",
    "run_sink",
    "run_source",
]

__version__ = "0.1.0"
