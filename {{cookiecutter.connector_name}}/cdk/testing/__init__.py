"""cdk.testing: the test kit a connector's own tests use (real HTTP on loopback, no mocks).

- ``CaptureTarget``: an HTTP receiver that records what a source delivers and can be
  told to fail, drop or delay the next requests; ``free_port`` picks a port for it.
- ``SinkClient``: send events to a sink in any mode, or raw
  bodies and headers, and read the ``Reply`` (status, headers, body).
- ``run_in_thread``: the connector in-process on a
  background event loop; ``ConnectorProcess``: ``python cmd/main.py`` with a test config.
- ``SinkTests`` / ``SourceTests``: the standard contract suites a project subclasses.
"""

from cdk.testing.client import Reply, SinkClient
from cdk.testing.runner import (
    ConnectorProcess,
    run_in_thread,
    run_to_exit,
)
from cdk.testing.suite import SinkTests, SourceTests, assert_same_events, sample_event
from cdk.testing.target import CapturedRequest, CaptureTarget, free_port

__all__ = [
    "CaptureTarget",
    "CapturedRequest",
    "ConnectorProcess",
    "Reply",
    "SinkClient",
    "SinkTests",
    "SourceTests",
    "assert_same_events",
    "free_port",
    "run_in_thread",
    "run_to_exit",
    "sample_event",
]
