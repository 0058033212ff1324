{%- if cookiecutter.source_style == "webhook" -%}
"""The source: turn each HTTP request the connector receives into a CloudEvent.

Edit ``make_event``. The kit serves HTTP on ``port`` (with optional bearer auth,
health and metrics), calls ``make_event`` for each ``POST``, delivers the event to
``target`` and answers the caller once it was delivered (2xx) or failed (an error
status the caller can retry on).
"""

import uuid
from datetime import UTC, datetime

import cdk
from internal.config import Config

#: The ``source`` attribute of every event this connector makes.
EVENT_SOURCE = "/{{ cookiecutter.connector_name }}"
EVENT_TYPE = "com.example.{{ cookiecutter.__package }}.received"


class {{ cookiecutter.__class_prefix }}Source(cdk.WebhookSource):
    """Makes one CloudEvent from each JSON request it receives."""

    def initialize(self, config: cdk.WebhookSourceConfig) -> None:
        # The runtime passes the Config that cmd/main.py names.
        assert isinstance(config, Config)
        self.config = config

    def make_event(self, request: cdk.Request) -> cdk.CloudEvent:
        """Build the event for one request.

        TODO: check the request (a signature header, the path...) and map it to an event.
        Raise ``cdk.HTTPError(status, message)`` to answer with that status instead.
        """
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise cdk.HTTPError(415, "send a JSON body (Content-Type: application/json)")
        data = request.json()  # answers 400 on malformed JSON
        if not isinstance(data, dict):
            raise cdk.HTTPError(400, "the JSON body must be an object")
        return cdk.CloudEvent(
            attributes={
                "id": str(uuid.uuid4()),
                "source": EVENT_SOURCE,
                "type": EVENT_TYPE,
                "specversion": "1.0",
                "time": datetime.now(UTC),
                "datacontenttype": "application/json",
                "subject": request.path,
            },
            data=data,
        )
{%- else -%}
"""The source: turn data from the outside world into CloudEvents.

Edit ``make_event`` (where events come from) and, if needed, ``initialize`` and
``destroy``. ``loop_produce_event`` puts each event in ``self.chan``; the kit delivers
it to ``target`` and calls back ``success`` or ``failed``.

The example keeps its position (the number of the last event the target acknowledged)
in a ``cdk.PositionStore``: with ``position_store`` set in config.yml, a restarted
source goes on after that event instead of starting again at 1.
"""

import asyncio
import logging
from datetime import UTC, datetime

import cdk
from internal.config import Config

log = logging.getLogger(__name__)

#: The connector's name: its namespace in the position store.
NAME = "{{ cookiecutter.connector_name }}"
#: The ``source`` attribute of every event this connector makes.
EVENT_SOURCE = "/" + NAME
EVENT_TYPE = "com.example.{{ cookiecutter.__package }}.made"


class {{ cookiecutter.__class_prefix }}Source(cdk.Source):
    """Makes an example event every ``interval`` seconds."""

    def __init__(self) -> None:
        self.number = 0
        self.interval = 1.0

    def initialize(self, config: cdk.SourceConfig) -> None:
        # The runtime passes the Config that cmd/main.py names.
        assert isinstance(config, Config)
        self.config = config
        self.interval = config.interval
        self.store = cdk.PositionStore.from_config(config, NAME)
        # Writes a position only once every event before it was acknowledged.
        self.checkpoint = cdk.Checkpoint(self.store, "number", log)
        self.number = self.checkpoint.position or 0

    def destroy(self) -> None:
        self.store.close()

    def make_event(self) -> cdk.CloudEvent:
        """Build the next event.

        TODO: read from your data producer here and map what it gives to an event.
        """
        self.number += 1
        return cdk.CloudEvent(
            attributes={
                "id": f"id-{self.number}",
                "source": EVENT_SOURCE,
                "type": EVENT_TYPE,
                "specversion": "1.0",
                "datacontenttype": "application/json",
                # An extension attribute, as in cdk-go's example ("time" is the standard one).
                "t": datetime.now(UTC),
            },
            data={"number": self.number, "string": f"str-{self.number}"},
        )

    async def loop_produce_event(self) -> None:
        """Make events forever; the kit stops this task at shutdown."""
        while True:
            event = self.make_event()
            event_id = event.get_id()

            def success(event_id: str = event_id) -> None:
                log.info("send event success: %s", event_id)

            def failed(error: BaseException, event_id: str = event_id) -> None:
                log.warning("send event failed: %s: %s", event_id, error)

            # The tuple's callbacks advance the checkpoint, then call these two.
            await self.chan.put(self.checkpoint.tuple(event, self.number, success, failed))
            await asyncio.sleep(self.interval)
{%- endif %}
