{%- if cookiecutter.source_style == "webhook" -%}
"""The source: turn each HTTP request the connector receives into a CloudEvent.

Edit ``make_event``. The kit serves HTTP on ``port`` (with optional bearer auth,
health and metrics), calls ``make_event`` for each ``POST``, delivers the event to
``target`` and answers the caller once it was delivered (2xx) or failed (an error
status the caller can retry on).
"""

import cdk
from internal.config import Config

#: The ``source`` attribute of every event this connector makes.
EVENT_SOURCE = "/{{ cookiecutter.connector_name }}"
EVENT_TYPE = "com.example.{{ cookiecutter.__package }}.received"


class {{ cookiecutter.__class_prefix }}Source(cdk.WebhookSource[Config]):
    """Makes one CloudEvent from each JSON request it receives."""

    def make_event(self, request: cdk.Request) -> cdk.CloudEvent:
        """Build the event for one request (the SDK fills in ``id`` and ``time``).

        TODO: check the request and map it to an event; ``self.config`` is your Config.
        Raise ``cdk.HTTPError(status, message)`` to answer with that status instead.
        """
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise cdk.HTTPError(415, "send a JSON body (Content-Type: application/json)")
        data = request.json()  # answers 400 on malformed JSON
        if not isinstance(data, dict):
            raise cdk.HTTPError(400, "the JSON body must be an object")
        return cdk.CloudEvent(
            attributes={
                "source": EVENT_SOURCE,
                "type": EVENT_TYPE,
                "datacontenttype": "application/json",
            },
            data=data,
        )
{%- else -%}
"""The source: turn data from the outside world into CloudEvents.

Edit ``make_event``. The kit calls it every ``interval`` seconds (config.yml), in a
worker thread so blocking reads are fine, delivers what it returns to ``target`` and
logs each outcome. Return the event, ``(event, position)`` to resume after that
position when the source restarts (``position_store`` in config.yml keeps it), a page
(a list of either, e.g. the next 500 rows after ``self.position``), or None / ``[]``
when there is nothing to send this time. An exception is retried with backoff;
``raise cdk.FatalError("why")`` stops the source. The README shows how to read several
partitions (tables, shards) with ``partitions()``.
"""

import cdk
from internal.config import Config

#: The ``source`` attribute of every event this connector makes.
EVENT_SOURCE = "/{{ cookiecutter.connector_name }}"
EVENT_TYPE = "com.example.{{ cookiecutter.__package }}.made"


class {{ cookiecutter.__class_prefix }}Source(cdk.Source[Config]):
    """Makes an example event every ``interval`` seconds, numbered on after a restart."""

    def make_event(self) -> tuple[cdk.CloudEvent, int]:
        """Build the next event and the position to resume after, once it was delivered.

        TODO: read from your data producer here and map what it gives to an event;
        ``self.config`` is your Config, ``self.position`` the last position returned.
        """
        number = (self.position or 0) + 1
        event = cdk.CloudEvent(
            attributes={"id": f"id-{number}", "source": EVENT_SOURCE, "type": EVENT_TYPE},
            data={"number": number, "string": f"str-{number}"},
        )
        return event, number
{%- endif %}
