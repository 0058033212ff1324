"""cdk.codec round trips (hypothesis) in all three modes, and cross-checks with the SDK.

Round trips: any valid event written in a mode and read back is the same event, except
where binary mode cannot carry the difference: extension values become their canonical
strings, and JSON data without a ``datacontenttype`` gets an explicit
``application/json``. The ``cloudevents`` SDK reads what the codec writes and the codec
reads what the SDK writes, wherever the SDK itself follows the spec.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings import http as sdk_http
from cloudevents.core.v03.event import CloudEvent as CloudEventV03
from cloudevents.core.v1.event import CloudEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdk.codec import (
    BATCH_CONTENT_TYPE,
    STRUCTURED_CONTENT_TYPE,
    CodecError,
    UnwritableEvent,
    from_http,
    to_batch,
    to_binary,
    to_structured,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CONTEXT = {
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "schemaurl",
    "datacontentencoding",
    "data",
}

# Strings an attribute may hold: no control characters, surrogates or noncharacters.
attr_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Cn")), min_size=1, max_size=24
)
names = st.from_regex(r"[a-z0-9]{1,24}", fullmatch=True).filter(lambda n: n not in CONTEXT)
uri_refs = st.one_of(
    st.from_regex(r"[a-z][a-z0-9+.\-]{0,6}:[A-Za-z0-9/._~\-]{1,16}", fullmatch=True),
    st.from_regex(r"/[A-Za-z0-9/._~\-]{0,16}(%[0-9A-F]{2})?", fullmatch=True),
)
abs_uris = st.from_regex(r"https://[a-z]{1,10}\.example/[a-z0-9/]{0,12}", fullmatch=True)
times = st.datetimes(
    min_value=datetime(1000, 1, 1),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30))]
    ),
)
ext_values = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Cn")), max_size=24),
    st.integers(-(2**31), 2**31 - 1),
    st.booleans(),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
JSON_TYPES = [None, "application/json", "application/vnd.example+json; charset=utf-8", "text/json"]
TEXT_TYPES = ["text/plain", "text/plain; charset=utf-8", "text/csv", "text/plain; charset=latin-1"]
BYTES_TYPES = [None, "application/octet-stream", "image/png"]


@st.composite
def data_and_type(draw: st.DrawFn) -> tuple[Any, str | None]:
    kind = draw(st.sampled_from(["none", "json", "text", "bytes"]))
    if kind == "none":
        return None, draw(st.sampled_from([None, "application/json", "text/plain"]))
    if kind == "json":
        return draw(json_values), draw(st.sampled_from(JSON_TYPES))
    if kind == "text":
        content_type = draw(st.sampled_from(TEXT_TYPES))
        top = 0xFF if "latin-1" in content_type else 0x10FFFF
        alphabet = st.characters(max_codepoint=top, blacklist_categories=["Cs"])
        return draw(st.text(alphabet=alphabet, min_size=1, max_size=40)), content_type
    return draw(st.binary(min_size=1, max_size=40)), draw(st.sampled_from(BYTES_TYPES))


@st.composite
def events(draw: st.DrawFn, version: str | None = None) -> Any:
    version = version or draw(st.sampled_from(["1.0", "1.0", "0.3"]))
    attributes: dict[str, Any] = {
        "specversion": version,
        "id": draw(attr_text),
        "source": draw(uri_refs),
        "type": draw(attr_text),
    }
    if draw(st.booleans()):
        attributes["subject"] = draw(attr_text)
    if draw(st.booleans()):
        attributes["time"] = draw(times)
    if draw(st.booleans()):
        if version == "1.0":
            attributes["dataschema"] = draw(abs_uris)
        else:
            attributes["schemaurl"] = draw(uri_refs)
    attributes.update(draw(st.dictionaries(names, ext_values, max_size=4)))
    data, content_type = draw(data_and_type())
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    event_type = CloudEvent if version == "1.0" else CloudEventV03
    event: Any = object.__new__(event_type)
    event._attributes = attributes
    event._data = data
    return event


def canonical_text(value: Any) -> Any:
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) is int:
        return str(value)
    return value


def expected_after_binary(event: Any) -> tuple[dict[str, Any], Any]:
    """What binary mode keeps: canonical strings and an explicit JSON content type."""
    attributes = {name: canonical_text(value) for name, value in event.get_attributes().items()}
    data = event.get_data()
    if data is not None and not isinstance(data, bytes) and "datacontenttype" not in attributes:
        attributes["datacontenttype"] = "application/json"
    return attributes, data


def expected_after_structured(event: Any) -> dict[str, Any]:
    """0.3 marks base64 data with its datacontentencoding attribute."""
    attributes = dict(event.get_attributes())
    if attributes["specversion"] == "0.3" and isinstance(event.get_data(), bytes):
        attributes["datacontentencoding"] = "base64"
    return attributes


def decode_one(headers: dict[str, str], body: bytes) -> Any:
    _, decoded = from_http(headers, body)
    assert len(decoded) == 1
    return decoded[0]


# --------------------------------------------------------------------------- round trips


@SETTINGS
@given(events())
def test_structured_round_trip(event: Any) -> None:
    again = decode_one(*to_structured(event))
    assert type(again) is type(event)
    assert again.get_attributes() == expected_after_structured(event)
    assert again.get_data() == event.get_data()


@SETTINGS
@given(events())
def test_binary_round_trip(event: Any) -> None:
    again = decode_one(*to_binary(event))
    attributes, data = expected_after_binary(event)
    assert type(again) is type(event)
    assert again.get_attributes() == attributes
    assert again.get_data() == data
    # A second trip changes nothing more.
    third = decode_one(*to_binary(again))
    assert third.get_attributes() == again.get_attributes()
    assert third.get_data() == again.get_data()


@SETTINGS
@given(st.sampled_from(["1.0", "0.3"]).flatmap(lambda v: st.lists(events(v), max_size=5)))
def test_batch_round_trip(batch: list[Any]) -> None:
    mode, again = from_http(*to_batch(batch))
    assert mode == "batch"
    assert [e.get_attributes() for e in again] == [expected_after_structured(e) for e in batch]
    assert [e.get_data() for e in again] == [e.get_data() for e in batch]


@SETTINGS
@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Cn")), min_size=1))
def test_header_values_round_trip_and_stay_printable_ascii(text: str) -> None:
    obj = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "subject": text}
    event = decode_one({"content-type": STRUCTURED_CONTENT_TYPE}, orjson.dumps(obj))
    headers, _ = to_binary(event)
    value = headers["ce-subject"]
    assert all(0x21 <= ord(c) <= 0x7E and c != '"' for c in value)
    assert decode_one(headers, b"").get_subject() == text


@SETTINGS
@given(
    content_type=st.sampled_from(
        [
            None,
            "application/json",
            "text/plain",
            "application/cloudevents+json",
            "application/cloudevents-batch+json",
            "application/octet-stream",
        ]
    ),
    subject=st.text(max_size=20),
    body=st.one_of(st.binary(max_size=60), json_values.map(lambda v: repr(v).encode())),
)
def test_arbitrary_input_gives_events_or_codec_errors(
    content_type: str | None, subject: str, body: bytes
) -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "1",
        "ce-source": "/s",
        "ce-type": "t",
        "ce-subject": subject,
    }
    if content_type is not None:
        headers["content-type"] = content_type
    try:
        from_http(headers, body)
    except CodecError as error:
        assert error.status in (400, 415)
        assert str(error)


@SETTINGS
@given(
    changes=st.dictionaries(
        st.sampled_from(sorted(CONTEXT | {"data_base64", "ext", "Bad", ""})) | st.text(max_size=6),
        json_values,
        max_size=6,
    ),
    batched=st.booleans(),
)
def test_arbitrary_json_members_give_events_or_codec_errors(
    changes: dict[str, Any], batched: bool
) -> None:
    obj = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", **changes}
    body = orjson.dumps([obj, obj] if batched else obj)
    content_type = BATCH_CONTENT_TYPE if batched else STRUCTURED_CONTENT_TYPE
    try:
        _, decoded = from_http({"content-type": content_type}, body)
    except CodecError as error:
        assert error.status in (400, 415)
        return
    # What was accepted can be written again in every mode (no charset in play here).
    for event in decoded:
        to_structured(event)
        to_binary(event)
    to_batch(decoded)


# --------------------------------------------------------------------------- writing checks

# Anything a user might put in an event: any character, names the SDK lets through
# (its check ends with ``$``, so a trailing newline passes), values of any type.
any_text = st.text(max_size=12)
lax_names = st.from_regex(r"[a-z0-9]{1,8}\n?", fullmatch=True).filter(lambda n: n not in CONTEXT)
any_values = st.one_of(
    any_text,
    st.integers(-(2**40), 2**40),
    st.booleans(),
    st.floats(allow_nan=False),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def user_events(draw: st.DrawFn) -> CloudEvent:
    attributes: dict[str, Any] = {
        "id": draw(any_text.filter(bool)),
        "source": draw(st.one_of(uri_refs, any_text.filter(bool))),
        "type": draw(any_text.filter(bool)),
        "time": draw(times),
    }
    if draw(st.booleans()):
        attributes["subject"] = draw(any_text.filter(bool))
    if draw(st.booleans()):
        attributes["dataschema"] = draw(st.one_of(abs_uris, any_text.filter(bool)))
    attributes.update(draw(st.dictionaries(lax_names, any_values, max_size=3)))
    data, content_type = draw(data_and_type())
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    return CloudEvent(attributes, data)


@SETTINGS
@given(user_events(), st.sampled_from(["binary", "structured", "batch"]))
def test_what_the_codec_writes_it_reads_and_what_it_refuses_is_unwritable(
    event: CloudEvent, mode: str
) -> None:
    try:
        if mode == "batch":
            headers, body = to_batch([event, event])
        else:
            headers, body = to_binary(event) if mode == "binary" else to_structured(event)
    except UnwritableEvent as exc:
        assert exc.attribute is not None, exc
        # The refusal is the decoder's: the same attribute, written by hand, is refused.
        value = event.get_attributes().get(exc.attribute)
        if exc.attribute != "data" and type(value) is str:
            obj = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
            obj[exc.attribute] = value
            with pytest.raises(CodecError):
                decode_one({"content-type": STRUCTURED_CONTENT_TYPE}, orjson.dumps(obj))
        return
    _, decoded = from_http(headers, body)
    assert [e.get_id() for e in decoded] == [event.get_id()] * len(decoded)


# --------------------------------------------------------------------------- the SDK


@st.composite
def sdk_events(draw: st.DrawFn) -> CloudEvent:
    """Events the SDK writes correctly: no booleans (it writes 'True'), JSON dicts."""
    attributes: dict[str, Any] = {
        "id": draw(attr_text),
        "source": draw(uri_refs),
        "type": draw(attr_text),
        "time": draw(times),
    }
    if draw(st.booleans()):
        attributes["subject"] = draw(attr_text)
    attributes.update(
        draw(st.dictionaries(names, st.one_of(attr_text, st.integers(0, 2**31 - 1)), max_size=3))
    )
    kind = draw(st.sampled_from(["json", "text", "bytes"]))
    if kind == "json":
        attributes["datacontenttype"] = "application/json"
        data: Any = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=4))
    elif kind == "text":
        attributes["datacontenttype"] = "text/plain"
        data = draw(st.text(min_size=1, max_size=30))
    else:
        attributes["datacontenttype"] = "application/octet-stream"
        data = draw(st.binary(min_size=1, max_size=30))
    return CloudEvent(attributes, data)


@SETTINGS
@given(sdk_events())
def test_codec_reads_what_the_sdk_writes_in_binary_mode(event: CloudEvent) -> None:
    message = sdk_http.to_binary_event(event)
    again = decode_one(message.headers, message.body)
    attributes, data = expected_after_binary(event)
    assert again.get_attributes() == attributes
    assert again.get_data() == data


@SETTINGS
@given(sdk_events())
def test_codec_reads_what_the_sdk_writes_in_structured_mode(event: CloudEvent) -> None:
    message = sdk_http.to_structured_event(event)
    again = decode_one(message.headers, message.body)
    assert again.get_attributes() == event.get_attributes()
    assert again.get_data() == event.get_data()


@SETTINGS
@given(sdk_events())
def test_sdk_reads_what_the_codec_writes(event: CloudEvent) -> None:
    headers, body = to_structured(event)
    parsed = sdk_http.from_http_event(sdk_http.HTTPMessage(headers=headers, body=body))
    assert parsed.get_attributes() == event.get_attributes()
    assert parsed.get_data() == event.get_data()

    headers, body = to_binary(event)
    parsed = sdk_http.from_http_event(sdk_http.HTTPMessage(headers=headers, body=body))
    attributes, data = expected_after_binary(event)
    assert parsed.get_attributes() == attributes
    if isinstance(data, bytes):
        # The SDK turns any UTF-8-decodable binary body into str; compare the bytes.
        sdk_data = parsed.get_data()
        assert (sdk_data.encode() if isinstance(sdk_data, str) else sdk_data) == data
    else:
        assert parsed.get_data() == data


@pytest.mark.parametrize(
    ("value", "encoded"),
    [("Euro € 😀", "Euro%20%E2%82%AC%20%F0%9F%98%80"), ('a "b" 100%', "a%20%22b%22%20100%25")],
)
def test_sdk_and_codec_agree_on_percent_encoding(value: str, encoded: str) -> None:
    event = CloudEvent({"id": "1", "source": "/s", "type": "t", "subject": value})
    assert sdk_http.to_binary_event(event).headers["ce-subject"] == encoded
    assert to_binary(event)[0]["ce-subject"] == encoded


def test_sdk_would_invent_what_the_codec_does_not() -> None:
    headers = {"ce-specversion": "1.0", "ce-source": "/s", "ce-type": "t"}
    invented = sdk_http.from_http_event(sdk_http.HTTPMessage(headers=headers, body=b""))
    assert invented.get_id()  # the SDK makes one up
    with pytest.raises(CodecError) as info:
        from_http(headers, b"")
    assert info.value.attribute == "id"


def test_sdk_accepts_invalid_utf8_the_codec_rejects() -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "1",
        "ce-source": "/s",
        "ce-type": "t",
        "ce-subject": "%C0%A0",
    }
    lenient = sdk_http.from_http_event(sdk_http.HTTPMessage(headers=headers, body=b""))
    assert lenient.get_subject()  # decoded leniently into a replacement character
    with pytest.raises(CodecError) as info:
        from_http(headers, b"")
    assert info.value.attribute == "subject"


def test_sdk_03_structured_bytes_are_read() -> None:
    event = CloudEventV03({"id": "1", "source": "/s", "type": "t"}, b"\x00\xff")
    message = sdk_http.to_structured_event(event)
    decoded: Any = from_http(message.headers, message.body)[1][0]
    assert type(decoded) is CloudEventV03
    assert decoded.get_data() == b"\x00\xff"
    assert decoded.get_attributes() == {**event.get_attributes(), "datacontentencoding": "base64"}
