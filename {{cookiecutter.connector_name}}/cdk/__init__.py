"""cdk: the connector-development kit vendored into every generated connector.

Its public API is what this module exports (``__all__``; ``cdk/README.md`` maps the
modules); everything else is private and may change.
"""

from cloudevents.core.v1.event import CloudEvent

from cdk.config import ConfigError, SinkConfig, SourceConfig, WebhookSourceConfig
from cdk.connector import SUCCESS, FatalError, Result, Sink, Source, Tuple, WebhookSource
from cdk.http import HTTPError, Request
from cdk.positions import Checkpoint
from cdk.runtime import run_sink, run_source
from cdk.store import PositionStore, StoreError

__all__ = [
    "SUCCESS",
    "Checkpoint",
    "CloudEvent",
    "ConfigError",
    "FatalError",
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
