"""The sink: act on the CloudEvents the connector receives.

Edit ``arrived``. The kit serves HTTP on ``port``, accepts binary, structured and
batched CloudEvents, and answers each request with the ``cdk.Result`` ``arrived``
returns: ``cdk.SUCCESS``, or ``cdk.Result(status, message)`` to refuse. A list of
Results answers for each event in turn, and a ``cdk.CloudEvent`` replies to a single
event (README.md, "When ``arrived`` fails").
"""

import json
import logging

import cdk
from internal.config import Config

log = logging.getLogger(__name__)


class {{ cookiecutter.__class_prefix }}Sink(cdk.Sink[Config]):
    """Prints the key/value pairs of each event's JSON data."""

    def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
        """Handle the events of one request (a batch arrives in one call).

        TODO: write the events where they belong; ``self.config`` is your Config. A plain
        ``def`` runs in a worker thread, so blocking I/O is fine here; ``async def`` runs
        on the event loop. Open connections in ``initialize``, close them in ``destroy``.
        """
        for event in events:
            data = event.get_data()
            if isinstance(data, bytes | str):
                try:
                    data = json.loads(data)
                except ValueError:
                    log.info("event %s: data is not JSON", event.get_id())
                    continue
            if not isinstance(data, dict):
                log.info("event %s: data is not a JSON object", event.get_id())
                continue
            # One write per event, so lines of events handled at once never interleave.
            print("".join(f"{key} {value}\n" for key, value in data.items()), end="", flush=True)
        return cdk.SUCCESS
