"""cdk.testing: the test kit a connector's own tests use (real HTTP on loopback, no mocks).

``SinkTests`` / ``SourceTests`` are the contract suites a project subclasses; the rest
(a capture target, a sink client, in-process and process runners) serves its own tests.
"""

from cdk.testing.client import Reply, SinkClient
from cdk.testing.runner import ConnectorProcess, run_in_thread
from cdk.testing.suite import SinkTests, SourceTests, assert_same_events, sample_event
from cdk.testing.target import CaptureTarget, free_port

__all__ = [
    "CaptureTarget",
    "ConnectorProcess",
    "Reply",
    "SinkClient",
    "SinkTests",
    "SourceTests",
    "assert_same_events",
    "free_port",
    "run_in_thread",
    "sample_event",
]
