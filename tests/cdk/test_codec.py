"""cdk.codec against the CloudEvents 1.0 HTTP binding and JSON format, rule by rule.

Each test names the rule it checks; valid and invalid inputs side by side. The round
trips and the cross-checks with the ``cloudevents`` SDK live in test_codec_roundtrip.py.
"""

from __future__ import annotations

import base64
import string
import tracemalloc
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from cloudevents.core.v03.event import CloudEvent as CloudEventV03
from cloudevents.core.v1.event import CloudEvent

from cdk.codec import (
    BATCH_CONTENT_TYPE,
    MAX_DATA_DEPTH,
    STRUCTURED_CONTENT_TYPE,
    TOKEN_CHARS,
    CodecError,
    InvalidEvent,
    UnsupportedContentType,
    UnwritableEvent,
    decoded_size,
    encode,
    from_http,
    to_batch,
    to_binary,
    to_structured,
    with_extensions,
)

BASE_HEADERS = {
    "ce-specversion": "1.0",
    "ce-id": "A234-1234-1234",
    "ce-source": "/mycontext",
    "ce-type": "com.example.someevent",
}
BASE_EVENT: dict[str, Any] = {
    "specversion": "1.0",
    "id": "A234-1234-1234",
    "source": "/mycontext",
    "type": "com.example.someevent",
}


def binary(body: bytes = b"", content_type: str | None = None, /, **ce: str | None) -> Any:
    """Decode a binary-mode request; ``ce`` adds or overrides ce- headers (None drops)."""
    headers = dict(BASE_HEADERS)
    for name, value in ce.items():
        if value is None:
            headers.pop(f"ce-{name}", None)
        else:
            headers[f"ce-{name}"] = value
    if content_type is not None:
        headers["content-type"] = content_type
    mode, events = from_http(headers, body)
    assert mode == "binary"
    assert len(events) == 1
    return events[0]


def structured(obj: Any, content_type: str = "application/cloudevents+json") -> Any:
    mode, events = from_http({"content-type": content_type}, orjson.dumps(obj))
    assert mode == "structured"
    assert len(events) == 1
    return events[0]


def event_json(**changes: Any) -> dict[str, Any]:
    obj = dict(BASE_EVENT)
    for name, value in changes.items():
        if value is _DROP:
            obj.pop(name, None)
        else:
            obj[name] = value
    return obj


_DROP = object()


def rejects(exc_type: type[CodecError], call: Any, *args: Any, **kwargs: Any) -> CodecError:
    """The call raises exactly ``exc_type`` (no leaked ValueError/JSONDecodeError)."""
    with pytest.raises(CodecError) as info:
        call(*args, **kwargs)
    assert type(info.value) is exc_type, repr(info.value)
    assert str(info.value)
    return info.value


# --------------------------------------------------------------------------- modes


@pytest.mark.parametrize(
    "content_type",
    [
        "application/cloudevents+json",
        "application/cloudevents+json; charset=utf-8",
        "Application/CloudEvents+JSON; charset=UTF-8",
        "APPLICATION/CLOUDEVENTS+JSON;charset=utf-8",
        "application/cloudevents+json ; charset=utf-8",
    ],
)
def test_structured_mode_by_content_type_case_insensitive_with_parameters(
    content_type: str,
) -> None:
    event = structured(BASE_EVENT, content_type)
    assert event.get_id() == "A234-1234-1234"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/cloudevents-batch+json",
        "application/cloudevents-batch+json; charset=UTF-8",
        "Application/CloudEvents-Batch+Json",
    ],
)
def test_batched_mode_by_content_type(content_type: str) -> None:
    mode, events = from_http({"content-type": content_type}, orjson.dumps([BASE_EVENT]))
    assert mode == "batch"
    assert [e.get_id() for e in events] == ["A234-1234-1234"]


@pytest.mark.parametrize(
    "content_type", [None, "application/json", "text/plain", "application/cloudevent+json"]
)
def test_any_other_content_type_is_binary_mode(content_type: str | None) -> None:
    event = binary(b"", content_type)
    assert event.get_type() == "com.example.someevent"


def test_structured_request_with_ce_headers_stays_structured() -> None:
    headers = {**BASE_HEADERS, "ce-id": "from-header", "content-type": STRUCTURED_CONTENT_TYPE}
    mode, events = from_http(headers, orjson.dumps(event_json(id="from-body")))
    assert mode == "structured"
    assert events[0].get_id() == "from-body"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/cloudevents+avro",
        "application/cloudevents+xml; charset=utf-8",
        "application/cloudevents",
        "application/cloudevents-batch+avro",
        "application/cloudevents-batch",
    ],
)
def test_event_formats_other_than_json_are_415(content_type: str) -> None:
    error = rejects(UnsupportedContentType, from_http, {"content-type": content_type}, b"{}")
    assert error.status == 415
    assert "format" in str(error)


@pytest.mark.parametrize("headers", [{}, {"content-type": "application/json"}])
def test_request_without_ce_headers_is_not_a_cloudevent(headers: dict[str, str]) -> None:
    error = rejects(InvalidEvent, from_http, headers, b'{"a": 1}')
    assert error.status == 400
    assert error.attribute == "specversion"
    assert "ce-specversion" in str(error)


def test_binary_request_missing_only_ce_specversion_is_rejected() -> None:
    headers = {k: v for k, v in BASE_HEADERS.items() if k != "ce-specversion"}
    error = rejects(InvalidEvent, from_http, headers, b"")
    assert error.attribute == "specversion"


# --------------------------------------------------------------------------- header values


def test_euro_example_decodes_from_percent_encoding() -> None:
    event = binary(subject="Euro%20%E2%82%AC%20%F0%9F%98%80")
    assert event.get_subject() == "Euro € 😀"


def test_euro_example_encodes_to_percent_encoding() -> None:
    event = binary(subject="Euro%20%E2%82%AC%20%F0%9F%98%80")
    headers, _ = to_binary(event)
    assert headers["ce-subject"] == "Euro%20%E2%82%AC%20%F0%9F%98%80"


def test_lower_case_hex_is_accepted() -> None:
    assert binary(subject="Euro%20%e2%82%ac").get_subject() == "Euro €"


def test_unnecessarily_encoded_characters_are_accepted() -> None:
    assert binary(subject="%41%42c").get_subject() == "ABc"


def test_exactly_one_round_of_percent_decoding() -> None:
    assert binary(subject="100%2525").get_subject() == "100%25"


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ('"hello world"', "hello world"),
        ('"say \\"hi\\""', 'say "hi"'),
        ('"back\\\\slash"', "back\\slash"),
        ('"Euro%20%E2%82%AC"', "Euro €"),
        ('""', None),
    ],
)
def test_quoted_strings_are_unescaped_before_percent_decoding(
    raw: str, decoded: str | None
) -> None:
    if decoded is None:  # an empty subject is not allowed
        assert rejects(InvalidEvent, binary, b"", None, subject=raw).attribute == "subject"
        return
    assert binary(subject=raw).get_subject() == decoded


def test_quoted_string_in_extension_and_id() -> None:
    event = binary(id='"id with space"', myext='"a b"')
    assert event.get_id() == "id with space"
    assert event.get_extension("myext") == "a b"


@pytest.mark.parametrize("raw", ["%C0%A0", "%FF", "%ED%A0%80", "abc%E2%82", "%F0%9F%98"])
def test_invalid_utf8_after_percent_decoding_is_rejected(raw: str) -> None:
    error = rejects(InvalidEvent, binary, b"", None, subject=raw)
    assert error.attribute == "subject"
    assert "UTF-8" in str(error)


def test_invalid_utf8_in_an_extension_names_the_extension() -> None:
    error = rejects(InvalidEvent, binary, b"", None, traceid="%C0%A0")
    assert error.attribute == "traceid"


@pytest.mark.parametrize("raw", ["50%", "%G1", "%4", "a%zzb", "100% sure", "%%41"])
def test_a_percent_that_starts_no_escape_is_a_literal(raw: str) -> None:
    # sdk-go does not percent-encode, so a bare '%' reaches receivers as it is.
    expected = raw.replace("%41", "A")
    assert binary(subject=raw, myext=raw).get_subject() == expected
    assert binary(subject=raw, myext=raw).get_extension("myext") == expected


def latin1(text: str) -> str:
    """``text`` sent as raw UTF-8 bytes, as an HTTP layer that reads Latin-1 hands it over."""
    return text.encode().decode("latin-1")


@pytest.mark.parametrize("text", ["héllo", "Euro € 😀", "日本語", "a%zz é"])
def test_raw_utf8_in_a_header_is_read_as_utf8(text: str) -> None:
    event = binary(subject=latin1(text), id=latin1(text), myext=latin1(text))
    assert event.get_subject() == event.get_id() == event.get_extension("myext") == text


def test_raw_utf8_and_percent_escapes_together() -> None:
    assert binary(subject=latin1("é%20€")).get_subject() == "é €"


def test_header_text_a_layer_already_decoded_is_taken_as_it_is() -> None:
    # aiohttp (the capture target) decodes header bytes as UTF-8 itself.
    assert binary(subject="héllo", myext="€ 100%").get_subject() == "héllo"
    assert binary(subject="Latin-1 caf\xe9").get_subject() == "Latin-1 café"


@pytest.mark.parametrize("raw", [latin1("é") + "%C0%A0", "\udcff", latin1("a\r")])
def test_raw_headers_are_still_checked_once_decoded(raw: str) -> None:
    assert rejects(InvalidEvent, binary, b"", None, subject=raw).attribute == "subject"


@pytest.mark.parametrize("raw", ['"unterminated', '"', '"a"b"', '"trailing\\"'])
def test_malformed_quoted_string_is_rejected(raw: str) -> None:
    error = rejects(InvalidEvent, binary, b"", None, subject=raw)
    assert error.attribute == "subject"


@pytest.mark.parametrize("raw", ["a%0Ab", "tab%09", "%7F", "%C2%85"])
def test_control_characters_are_not_allowed_in_strings(raw: str) -> None:
    error = rejects(InvalidEvent, binary, b"", None, subject=raw)
    assert error.attribute == "subject"


def test_encoding_escapes_space_quote_percent_and_non_ascii_only() -> None:
    printable = "".join(chr(c) for c in range(0x21, 0x7F))
    event = with_extensions(binary(), {"ext": printable + ' é"% '})
    headers, _ = to_binary(event)
    expected = printable.replace("%", "%25").replace('"', "%22") + "%20%C3%A9%22%25%20"
    assert headers["ce-ext"] == expected
    assert binary(ext=headers["ce-ext"]).get_extension("ext") == printable + ' é"% '


def test_encoding_uses_upper_case_hex() -> None:
    headers, _ = to_binary(with_extensions(binary(), {"ext": "\u00ff"}))
    assert headers["ce-ext"] == "%C3%BF"


# --------------------------------------------------------------------------- required


@pytest.mark.parametrize("name", ["id", "source", "type"])
def test_missing_required_attribute_is_rejected_binary(name: str) -> None:
    error = rejects(InvalidEvent, binary, b"", None, **{name: None})
    assert error.attribute == name
    assert name in str(error)


@pytest.mark.parametrize("name", ["id", "source", "type", "specversion"])
def test_missing_required_attribute_is_rejected_structured(name: str) -> None:
    error = rejects(InvalidEvent, structured, event_json(**{name: _DROP}))
    assert error.attribute == name


@pytest.mark.parametrize("name", ["id", "source", "type", "specversion"])
def test_null_required_attribute_is_missing(name: str) -> None:
    error = rejects(InvalidEvent, structured, event_json(**{name: None}))
    assert error.attribute == name


@pytest.mark.parametrize("name", ["id", "source", "type"])
def test_empty_required_attribute_is_rejected(name: str) -> None:
    assert rejects(InvalidEvent, binary, b"", None, **{name: ""}).attribute == name
    assert rejects(InvalidEvent, structured, event_json(**{name: ""})).attribute == name


@pytest.mark.parametrize("value", [1, True, ["x"], {"a": 1}])
def test_required_attribute_must_be_a_string(value: Any) -> None:
    for name in ("id", "source", "type", "specversion"):
        assert rejects(InvalidEvent, structured, event_json(**{name: value})).attribute == name


@pytest.mark.parametrize("version", ["2.0", "1.1", "0.2", "", "1"])
def test_unknown_specversion_is_rejected(version: str) -> None:
    error = rejects(InvalidEvent, structured, event_json(specversion=version))
    assert error.attribute == "specversion"
    error = rejects(InvalidEvent, binary, b"", None, specversion=version)
    assert error.attribute == "specversion"


def test_nothing_missing_is_invented() -> None:
    for event in (binary(), structured(BASE_EVENT)):
        attributes = event.get_attributes()
        assert set(attributes) == {"specversion", "id", "source", "type"}
        assert event.get_time() is None
        assert event.get_data() is None
        assert type(event) is CloudEvent


# --------------------------------------------------------------------------- optional


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2018-04-05T17:31:00Z", datetime(2018, 4, 5, 17, 31, tzinfo=UTC)),
        ("2018-04-05t17:31:00z", datetime(2018, 4, 5, 17, 31, tzinfo=UTC)),
        ("2018-04-05T17:31:00.5Z", datetime(2018, 4, 5, 17, 31, 0, 500000, tzinfo=UTC)),
        (
            "2018-04-05T17:31:00.123456789+02:00",
            datetime(2018, 4, 5, 17, 31, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
        ),
        ("2018-04-05T17:31:00-00:00", datetime(2018, 4, 5, 17, 31, tzinfo=UTC)),
        ("1985-04-12T23:20:50.52Z", datetime(1985, 4, 12, 23, 20, 50, 520000, tzinfo=UTC)),
    ],
)
def test_time_is_rfc3339_and_becomes_an_aware_datetime(text: str, expected: datetime) -> None:
    for event in (binary(time=text), structured(event_json(time=text))):
        time = event.get_time()
        assert time == expected
        assert time.tzinfo is not None


@pytest.mark.parametrize(
    "text",
    [
        "2018-04-05T17:31:00",  # no offset: naive
        "2018-04-05",
        "2018-04-05T17:31Z",
        "2018-04-05 17:31:00Z",
        "2018-04-05T17:31:00,5Z",
        "2018-04-05T17:31:00.Z",
        "2018-04-05T17:31:00+0200",
        "2018-04-05T17:31:00+02",
        "2018-04-05T17:31:00+02:00:00",
        "2018-W14-4T17:31:00Z",
        "20180405T173100Z",
        "2018-13-05T17:31:00Z",
        "2018-04-05T25:31:00Z",
        "yesterday",
        "",
    ],
)
def test_time_that_is_not_rfc3339_is_rejected(text: str) -> None:
    error = rejects(InvalidEvent, structured, event_json(time=text))
    assert error.attribute == "time"
    assert "RFC 3339" in str(error)


def test_time_must_be_a_string_in_json() -> None:
    assert rejects(InvalidEvent, structured, event_json(time=1234567890)).attribute == "time"


@pytest.mark.parametrize(
    "source",
    [
        "https://github.com/cloudevents",
        "mailto:cncf-wg-serverless@lists.cncf.io",
        "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
        "/cloudevents/spec/pull/123",
        "1-555-123-4567",
        "vanus-source",
        "a/b?c=d#e%20f",
    ],
)
def test_source_accepts_uri_references(source: str) -> None:
    assert structured(event_json(source=source)).get_source() == source


@pytest.mark.parametrize(
    "source", ["has space", "a<b>", "bad%zz", "1ab:c", "é", "back\\slash", "{curly}"]
)
def test_source_must_be_a_uri_reference(source: str) -> None:
    assert rejects(InvalidEvent, structured, event_json(source=source)).attribute == "source"


def test_dataschema_must_be_a_non_empty_absolute_uri() -> None:
    ok = structured(event_json(dataschema="https://example.com/schema.json"))
    assert ok.get_dataschema() == "https://example.com/schema.json"
    for bad in ("", "/relative/schema", "has space", 5):
        error = rejects(InvalidEvent, structured, event_json(dataschema=bad))
        assert error.attribute == "dataschema"


def test_subject_must_be_non_empty_when_present() -> None:
    assert structured(event_json(subject="s")).get_subject() == "s"
    assert rejects(InvalidEvent, structured, event_json(subject="")).attribute == "subject"
    assert structured(event_json(subject=None)).get_subject() is None


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        'text/plain; charset="utf-8"',
        "application/vnd.apache.thrift.binary",
        "Application/XML",
        "text/plain;",
    ],
)
def test_datacontenttype_accepts_rfc2046_media_types(content_type: str) -> None:
    event = structured(event_json(datacontenttype=content_type))
    assert event.get_datacontenttype() == content_type


@pytest.mark.parametrize(
    "content_type",
    ["json", "application/", "/json", "a b/c", "text/plain; charset", "x/y; =v", 'x/y; a="b'],
)
def test_datacontenttype_must_be_a_media_type(content_type: str) -> None:
    error = rejects(InvalidEvent, structured, event_json(datacontenttype=content_type))
    assert error.attribute == "datacontenttype"


@pytest.mark.parametrize(
    ("content_type", "text"),
    [
        ('text/plain; x="a\\"b;c=d"; charset=latin-1', "grüße".encode("latin-1")),
        ("text/plain ; ; CHARSET = latin-1 ;", "grüße".encode("latin-1")),
        ('text/plain; charset="utf-8"', "grüße".encode()),
    ],
)
def test_charset_is_found_among_parameters(content_type: str, text: bytes) -> None:
    assert binary(text, content_type).get_data() == "grüße"


def test_token_chars_are_rfc9110_tchar() -> None:
    # tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" /
    #         "`" / "|" / "~" / DIGIT / ALPHA
    assert frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~") == TOKEN_CHARS
    for char in sorted(set(map(chr, range(0x21, 0x7F))) - TOKEN_CHARS):
        bad = f"application/x{char}y"
        assert rejects(InvalidEvent, structured, event_json(datacontenttype=bad))


def test_binary_content_type_must_be_a_media_type() -> None:
    error = rejects(InvalidEvent, binary, b"x", "not a media type")
    assert error.attribute == "datacontenttype"


def test_ce_datacontenttype_header_is_not_allowed_in_binary_mode() -> None:
    error = rejects(InvalidEvent, binary, b"", "application/json", datacontenttype="text/plain")
    assert error.attribute == "datacontenttype"


def test_control_characters_in_json_strings_are_rejected() -> None:
    assert rejects(InvalidEvent, structured, event_json(id="a\nb")).attribute == "id"
    assert rejects(InvalidEvent, structured, event_json(ext="a\x00b")).attribute == "ext"
    assert rejects(InvalidEvent, structured, event_json(ext="\ufffe")).attribute == "ext"


def test_non_ascii_and_paired_surrogates_are_fine() -> None:
    event = structured(event_json(subject="grüße 😀", ext="\u00a0nbsp"))
    assert event.get_subject() == "grüße 😀"
    assert event.get_extension("ext") == "\u00a0nbsp"


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["abc", "a1", "123", "averyveryverylongextensionname30"])
def test_attribute_names_are_lower_case_letters_and_digits(name: str) -> None:
    assert structured(event_json(**{name: "v"})).get_extension(name) == "v"
    assert binary(**{name: "v"}).get_extension(name) == "v"


@pytest.mark.parametrize("name", ["camelCase", "with_underscore", "with-dash", "é", "a b", ""])
def test_attribute_names_outside_the_charset_are_rejected(name: str) -> None:
    error = rejects(InvalidEvent, structured, event_json(**{name: "v"}))
    assert error.attribute == name


def test_data_is_not_an_attribute_name_in_binary_mode() -> None:
    assert rejects(InvalidEvent, binary, b"", None, data="x").attribute == "data"


def test_data_base64_is_not_an_attribute_in_binary_mode() -> None:
    headers = {**BASE_HEADERS, "ce-data_base64": "eA=="}
    assert rejects(InvalidEvent, from_http, headers, b"").attribute == "data_base64"


def test_empty_ce_header_name_is_rejected() -> None:
    assert rejects(InvalidEvent, from_http, {**BASE_HEADERS, "ce-": "x"}, b"")


# --------------------------------------------------------------------------- extensions


def test_extension_types_are_kept_in_json() -> None:
    event = structured(event_json(s="text", i=42, neg=-(2**31), t=True, f=False, empty=""))
    assert event.get_extension("s") == "text"
    assert event.get_extension("i") == 42
    assert event.get_extension("neg") == -(2**31)
    assert event.get_extension("t") is True
    assert event.get_extension("f") is False
    assert event.get_extension("empty") == ""


def test_null_means_unset() -> None:
    event = structured(event_json(ext=None, subject=None, time=None, datacontenttype=None))
    assert set(event.get_attributes()) == {"specversion", "id", "source", "type"}


@pytest.mark.parametrize("value", [1.5, 1.0, 2**31, -(2**31) - 1, [1], {"a": 1}])
def test_extension_values_must_be_string_boolean_or_32_bit_integer(value: Any) -> None:
    assert rejects(InvalidEvent, structured, event_json(ext=value)).attribute == "ext"


def test_binary_extensions_are_strings() -> None:
    assert binary(count="42").get_extension("count") == "42"


# --------------------------------------------------------------------------- JSON data


def test_data_and_data_base64_are_exclusive() -> None:
    error = rejects(InvalidEvent, structured, event_json(data={"a": 1}, data_base64="eA=="))
    assert "data_base64" in str(error)


def test_data_base64_becomes_bytes() -> None:
    raw = bytes(range(256))
    event = structured(event_json(data_base64=base64.b64encode(raw).decode()))
    assert event.get_data() == raw


@pytest.mark.parametrize("value", ["not base64!", "eA=", 5, ["eA=="]])
def test_data_base64_must_be_valid_base64(value: Any) -> None:
    error = rejects(InvalidEvent, structured, event_json(data_base64=value))
    assert error.attribute == "data_base64"


def test_null_data_base64_is_unset() -> None:
    assert structured(event_json(data={"a": 1}, data_base64=None)).get_data() == {"a": 1}


@pytest.mark.parametrize(
    "content_type",
    [
        _DROP,
        "application/json",
        "application/json; charset=utf-8",
        "text/json",
        "application/vnd.api+json",
        "application/cloudevents+json",
        "APPLICATION/JSON",
    ],
)
@pytest.mark.parametrize("data", [{"a": [1, 2.5, None]}, [1, "x"], 3, 2.5, True, "a string"])
def test_json_data_is_kept_as_the_json_value(content_type: Any, data: Any) -> None:
    event = structured(event_json(datacontenttype=content_type, data=data))
    assert event.get_data() == data
    assert type(event.get_data()) is type(data)


def test_string_data_is_never_parsed_again() -> None:
    for content_type in (_DROP, "application/json", "text/plain"):
        event = structured(event_json(datacontenttype=content_type, data='{"a": 1}'))
        assert event.get_data() == '{"a": 1}'


def test_null_data_is_no_data() -> None:
    assert structured(event_json(data=None)).get_data() is None


def test_non_json_content_type_keeps_string_data() -> None:
    event = structured(event_json(datacontenttype="application/xml", data='<much wow="xml"/>'))
    assert event.get_data() == '<much wow="xml"/>'


@pytest.mark.parametrize("data", [{"a": 1}, [1], 5, True])
def test_non_json_content_type_needs_string_data(data: Any) -> None:
    error = rejects(InvalidEvent, structured, event_json(datacontenttype="text/plain", data=data))
    assert error.attribute == "data"


# --------------------------------------------------------------------------- binary data


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "application/vnd.api+json"],
)
def test_binary_json_body_is_parsed(content_type: str) -> None:
    assert binary(b'{"a": [1, 2]}', content_type).get_data() == {"a": [1, 2]}
    assert binary(b'"I\'m just a string"', content_type).get_data() == "I'm just a string"


@pytest.mark.parametrize("body", [b"{", b"not json", b"\xff\xfe", b'{"a": NaN}', b"[1,]"])
def test_binary_invalid_json_body_is_rejected(body: bytes) -> None:
    error = rejects(InvalidEvent, binary, body, "application/json")
    assert error.attribute == "data"


def test_binary_text_body_is_decoded_with_its_charset() -> None:
    assert binary("grüße".encode(), "text/plain").get_data() == "grüße"
    assert binary("grüße".encode("latin-1"), "text/plain; charset=latin-1").get_data() == "grüße"


def test_binary_text_body_invalid_in_its_charset_is_rejected() -> None:
    error = rejects(InvalidEvent, binary, b"\xff\xfe", "text/plain; charset=utf-8")
    assert error.attribute == "data"


def test_binary_text_body_in_an_unknown_charset_is_415() -> None:
    error = rejects(UnsupportedContentType, binary, b"x", "text/plain; charset=klingon")
    assert error.status == 415


def test_binary_other_body_is_bytes() -> None:
    assert binary(b"\x00\x01", "application/octet-stream").get_data() == b"\x00\x01"
    assert binary(b"<a/>", "application/xml").get_data() == b"<a/>"


def test_binary_without_content_type_keeps_bytes_and_no_datacontenttype() -> None:
    event = binary(b'{"a": 1}')
    assert event.get_data() == b'{"a": 1}'
    assert event.get_datacontenttype() is None


def test_binary_empty_body_is_no_data() -> None:
    event = binary(b"", "application/json")
    assert event.get_data() is None
    assert event.get_datacontenttype() == "application/json"


# --------------------------------------------------------------------------- bad JSON


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"not json",
        b"\xff",
        b"[]",
        b'"string"',
        b"null",
        b"5",
        nested(2000),
        b'{"a": ' + b"1" * 400 + b"}",
    ],
)
def test_bad_structured_bodies_are_invalid_events(body: bytes) -> None:
    rejects(InvalidEvent, from_http, {"content-type": STRUCTURED_CONTENT_TYPE}, body)


def test_data_nested_deeper_than_the_limit_is_rejected() -> None:
    body = orjson.dumps(event_json(datacontenttype="application/json"))[:-1]
    deep = body + b',"data":' + nested(MAX_DATA_DEPTH + 1) + b"}"
    error = rejects(InvalidEvent, from_http, {"content-type": STRUCTURED_CONTENT_TYPE}, deep)
    assert error.attribute == "data"
    ok = body + b',"data":' + nested(MAX_DATA_DEPTH) + b"}"
    event = from_http({"content-type": STRUCTURED_CONTENT_TYPE}, ok)[1][0]
    # What was accepted can be written out again, in every mode.
    to_structured(event)
    to_batch([event])
    to_binary(event)


def test_data_nested_too_deep_in_any_event_of_a_batch_is_rejected() -> None:
    # The batch is checked in one pass: every event's data is at the depth of [[data]].
    body = orjson.dumps(event_json(datacontenttype="application/json"))[:-1]
    fine = body + b',"data":' + nested(MAX_DATA_DEPTH) + b"}"
    deep = body + b',"data":' + nested(MAX_DATA_DEPTH + 1) + b"}"
    headers = {"content-type": BATCH_CONTENT_TYPE}
    error = rejects(InvalidEvent, from_http, headers, b"[" + fine + b"," + deep + b"]")
    assert error.attribute == "data"
    events = from_http(headers, b"[" + fine + b"," + fine + b"]")[1]
    to_batch(events)


def test_binary_json_body_nested_too_deep_is_rejected() -> None:
    error = rejects(InvalidEvent, binary, nested(MAX_DATA_DEPTH + 1), "application/json")
    assert error.attribute == "data"
    rejects(InvalidEvent, binary, nested(5000), "application/json")


def test_deeply_nested_but_wide_data_is_fine() -> None:
    wide = [[1]] * 500  # many brackets, little depth
    assert structured(event_json(data=wide)).get_data() == wide


# --------------------------------------------------------------------------- batch


def batch(body: bytes) -> list[Any]:
    mode, events = from_http({"content-type": BATCH_CONTENT_TYPE}, body)
    assert mode == "batch"
    return events


def test_empty_batch_is_valid() -> None:
    assert batch(b"[]") == []


def test_batch_of_several_events() -> None:
    body = orjson.dumps([event_json(id="1"), event_json(id="2", data_base64="eA==")])
    events = batch(body)
    assert [e.get_id() for e in events] == ["1", "2"]
    assert events[1].get_data() == b"x"


def test_batch_events_must_share_a_specversion() -> None:
    body = orjson.dumps([event_json(), event_json(specversion="0.3")])
    error = rejects(InvalidEvent, batch, body)
    assert "same specversion" in str(error)


@pytest.mark.parametrize("body", [b"{}", b'"x"', b"null", b"[1]", b"[[]]", b"[", nested(3000)])
def test_batch_must_be_an_array_of_objects(body: bytes) -> None:
    rejects(InvalidEvent, batch, body)


def test_one_invalid_event_rejects_the_batch() -> None:
    body = orjson.dumps([event_json(), event_json(id="")])
    assert rejects(InvalidEvent, batch, body).attribute == "id"


def test_batch_of_03_events() -> None:
    body = orjson.dumps([event_json(specversion="0.3"), event_json(specversion="0.3", id="2")])
    events = batch(body)
    assert all(type(e) is CloudEventV03 for e in events)


# --------------------------------------------------------------------------- 0.3


def test_structured_03_with_base64_encoding_gives_bytes() -> None:
    obj = event_json(
        specversion="0.3",
        datacontentencoding="base64",
        datacontenttype="application/octet-stream",
        schemaurl="/schemas/x",
        data=base64.b64encode(b"\x00\xff").decode(),
    )
    event = structured(obj)
    assert type(event) is CloudEventV03
    assert event.get_data() == b"\x00\xff"
    assert event.get_schemaurl() == "/schemas/x"
    assert event.get_datacontentencoding() == "base64"


def test_structured_03_json_data() -> None:
    event = structured(event_json(specversion="0.3", data={"a": 1}))
    assert type(event) is CloudEventV03
    assert event.get_data() == {"a": 1}


def test_structured_03_bad_base64_is_rejected() -> None:
    obj = event_json(specversion="0.3", datacontentencoding="Base64", data="%%%")
    assert rejects(InvalidEvent, structured, obj).attribute == "data"


def test_03_has_no_data_base64_member() -> None:
    obj = event_json(specversion="0.3", data_base64="eA==")
    assert rejects(InvalidEvent, structured, obj).attribute == "data_base64"


def test_binary_03() -> None:
    event = binary(b"hi", "text/plain", specversion="0.3", schemaurl="https://x/s")
    assert type(event) is CloudEventV03
    assert event.get_data() == "hi"
    assert event.get_schemaurl() == "https://x/s"


def test_03_bytes_are_written_with_datacontentencoding() -> None:
    event = binary(b"\x00\x01", "application/octet-stream", specversion="0.3")
    obj = to_dict(event)
    assert obj["datacontentencoding"] == "base64"
    assert obj["data"] == "AAE="
    assert "data_base64" not in obj
    assert structured(obj).get_data() == b"\x00\x01"


# --------------------------------------------------------------------------- writing


def to_dict(event: CloudEvent) -> Any:
    """The JSON-format object of ``event``, as structured mode writes it."""
    return orjson.loads(to_structured(event)[1])


def make(data: Any = None, **attributes: Any) -> CloudEvent:
    return structured({**BASE_EVENT, **attributes, **({} if data is None else {"data": data})})


def test_binary_headers_are_lower_case_ce_names_and_content_type() -> None:
    event = make(
        {"a": 1},
        datacontenttype="application/json",
        time="2018-04-05T17:31:00Z",
        flag=True,
        count=5,
    )
    headers, body = to_binary(event)
    assert headers == {
        "ce-specversion": "1.0",
        "ce-id": "A234-1234-1234",
        "ce-source": "/mycontext",
        "ce-type": "com.example.someevent",
        "ce-time": "2018-04-05T17:31:00Z",
        "ce-flag": "true",
        "ce-count": "5",
        "content-type": "application/json",
    }
    assert orjson.loads(body) == {"a": 1}


def test_binary_without_datacontenttype_makes_json_explicit() -> None:
    headers, body = to_binary(make("I'm just a string"))
    assert headers["content-type"] == "application/json"
    assert body == b'"I\'m just a string"'


def test_binary_bytes_go_out_as_they_are() -> None:
    event = with_extensions(binary(b"\x00raw", "application/octet-stream"), {})
    headers, body = to_binary(event)
    assert body == b"\x00raw"
    assert headers["content-type"] == "application/octet-stream"
    headers, body = to_binary(binary(b"\x00raw"))
    assert body == b"\x00raw"
    assert "content-type" not in headers


def test_binary_text_uses_the_declared_charset() -> None:
    event = make("grüße", datacontenttype="text/plain; charset=latin-1")
    assert to_binary(event)[1] == "grüße".encode("latin-1")
    assert to_binary(make("grüße", datacontenttype="text/plain"))[1] == "grüße".encode()


def test_writing_non_string_data_with_a_non_json_content_type_fails() -> None:
    event = binary(b"x", "text/plain")
    event._data = {"a": 1}  # what user code could put in an event
    rejects(UnwritableEvent, to_binary, event)
    rejects(UnwritableEvent, to_structured, event)


def test_writing_unserialisable_json_data_fails_as_unwritable_event() -> None:
    event = make({"a": 1})
    event._data = {"a": object()}
    assert rejects(UnwritableEvent, to_binary, event).attribute == "data"
    assert rejects(UnwritableEvent, to_structured, event).attribute == "data"


def test_structured_headers_and_bytes_as_data_base64() -> None:
    event = binary(b"\x00\x01", "application/octet-stream")
    headers, body = to_structured(event)
    assert headers == {"content-type": "application/cloudevents+json; charset=utf-8"}
    obj = orjson.loads(body)
    assert obj["data_base64"] == "AAE="
    assert "data" not in obj


def test_structured_time_is_rfc3339_with_z() -> None:
    event = make(time="2018-04-05T17:31:00.25+00:00")
    assert orjson.loads(to_structured(event)[1])["time"] == "2018-04-05T17:31:00.250000Z"


def test_batch_headers_and_body() -> None:
    headers, body = to_batch([make(id="1"), make(id="2")])
    assert headers == {"content-type": "application/cloudevents-batch+json; charset=utf-8"}
    assert [obj["id"] for obj in orjson.loads(body)] == ["1", "2"]
    assert to_batch([]) == (headers, b"[]")


def test_batch_of_mixed_specversions_cannot_be_written() -> None:
    mixed = [make(), make(specversion="0.3")]
    assert rejects(UnwritableEvent, to_batch, mixed).attribute == "specversion"


def test_encode_dispatches_on_mode() -> None:
    event = make({"a": 1})
    assert encode([event], "binary") == to_binary(event)
    assert encode([event], "structured") == to_structured(event)
    assert encode([event, event], "batch") == to_batch([event, event])
    rejects(CodecError, encode, [event, event], "binary")
    rejects(CodecError, encode, [], "structured")
    rejects(CodecError, encode, [event], "avro")


def test_to_dict_and_back() -> None:
    event = make({"a": 1}, time="2018-04-05T17:31:00Z", ext=3)
    obj = to_dict(event)
    assert obj == {**BASE_EVENT, "time": "2018-04-05T17:31:00Z", "ext": 3, "data": {"a": 1}}
    again = structured(obj)
    assert again.get_attributes() == event.get_attributes()
    assert again.get_data() == {"a": 1}
    rejects(InvalidEvent, structured, {"id": "x"})


# --------------------------------------------------------------------------- with_extensions


def test_with_extensions_returns_a_new_event() -> None:
    event = make({"a": 1}, old="x")
    changed = with_extensions(event, {"team": "core", "priority": 3, "old": None})
    assert changed is not event
    assert changed.get_extension("team") == "core"
    assert changed.get_extension("priority") == 3
    assert "old" not in changed.get_attributes()
    assert changed.get_data() == {"a": 1}
    assert event.get_extension("old") == "x"
    assert "team" not in event.get_attributes()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Bad", "x"),
        ("with_underscore", "x"),
        ("data", "x"),
        ("id", "x"),
        ("source", "x"),
        ("ok", 1.5),
        ("ok", [1]),
        ("ok", 2**40),
        ("ok", "a\nb"),
    ],
)
def test_with_extensions_validates(name: str, value: Any) -> None:
    rejects(InvalidEvent, with_extensions, make(), {name: value})


def test_with_extensions_keeps_the_03_type() -> None:
    event: Any = with_extensions(make(specversion="0.3"), {"x": "y"})
    assert type(event) is CloudEventV03
    assert event.get_extension("x") == "y"


def test_errors_are_value_errors_with_status() -> None:
    error = rejects(InvalidEvent, structured, event_json(id=""))
    assert isinstance(error, ValueError)
    assert error.status == 400
    assert len(str(error)) < 200


def test_empty_content_type_is_no_content_type() -> None:
    event = binary(b"\x00", "")
    assert event.get_datacontenttype() is None
    assert event.get_data() == b"\x00"


def test_unknown_mode_is_named() -> None:
    error = rejects(CodecError, encode, [make(), make()], "avro")
    assert "avro" in str(error)


def test_times_are_written_in_rfc3339() -> None:
    odd = datetime(2026, 1, 1, 0, 0, 30, tzinfo=timezone(timedelta(seconds=30)))
    event = make()
    event._attributes["time"] = odd
    assert to_binary(event)[0]["ce-time"] == "2026-01-01T00:00:00Z"
    event._attributes["time"] = datetime(2026, 1, 1, 5, 6, 7, 89)  # naive: taken as UTC
    assert to_dict(event)["time"] == "2026-01-01T05:06:07.000089Z"
    event._attributes["time"] = datetime(2026, 1, 1, 5, tzinfo=timezone(timedelta(hours=-3)))
    assert to_dict(event)["time"] == "2026-01-01T05:00:00-03:00"


def test_binary_time_is_checked_like_structured() -> None:
    assert binary(time="2018-04-05T17:31:00Z").get_time() == datetime(
        2018, 4, 5, 17, 31, tzinfo=UTC
    )
    assert rejects(InvalidEvent, binary, b"", None, time="2018-04-05").attribute == "time"


@pytest.mark.parametrize("data", [b"raw", None])
def test_binary_refuses_a_content_type_that_would_inject_a_header(data: bytes | None) -> None:
    # Built with the SDK, which checks only that datacontenttype is a string.
    attributes = {**BASE_EVENT, "datacontenttype": "text/plain\r\nx-injected: 1"}
    event = CloudEvent(attributes, data)
    with pytest.raises(InvalidEvent) as info:
        to_binary(event)
    assert info.value.attribute == "datacontenttype"


# --------------------------------------------------------------------------- writing checks

ENCODERS = [to_binary, to_structured, lambda event: to_batch([event])]


def sdk_event(**attributes: Any) -> CloudEvent:
    """An event the SDK builds (it checks types and presence, not characters or URIs)."""
    return CloudEvent({**BASE_EVENT, **attributes}, {"a": 1})


@pytest.mark.parametrize("encoder", ENCODERS, ids=["binary", "structured", "batch"])
@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("subject", "line\r\nbreak"),
        ("subject", "nul\x00"),
        ("id", "a\nb"),
        ("type", "tab\there"),
        ("subject", "del\x7f"),
        ("subject", "c1\x85"),
        ("subject", "nonchar\ufffe"),
        ("source", "/a\r\nb"),
        ("source", "has space"),
        ("source", "bad%zz"),
        ("dataschema", "relative/only"),
        ("traceparent", "00-ab\r\n"),
        ("myext", 2**31),
        ("myext", 1.5),
        ("myext", ["a"]),
    ],
)
def test_what_a_receiver_refuses_is_not_written(encoder: Any, attribute: str, value: Any) -> None:
    event = sdk_event(**{attribute: value})
    error = rejects(UnwritableEvent, encoder, event)
    assert error.attribute == attribute
    assert error.status == 400


@pytest.mark.parametrize("encoder", ENCODERS, ids=["binary", "structured", "batch"])
@pytest.mark.parametrize("name", ["ext\n", "Upper", "da-sh", "data"])
def test_attribute_names_a_receiver_refuses_are_not_written(encoder: Any, name: str) -> None:
    event = sdk_event()
    event.get_attributes()[name] = "v"  # the SDK's name check passes "ext\n"; others by hand
    assert rejects(UnwritableEvent, encoder, event).attribute == name


@pytest.mark.parametrize("encoder", ENCODERS, ids=["binary", "structured", "batch"])
def test_an_event_that_was_written_once_is_still_checked_after_a_change(encoder: Any) -> None:
    event = sdk_event(subject="fine", myext="fine")
    encoder(event)
    event.get_attributes()["myext"] = "now\nbroken"  # same names, so no cache hides it
    assert rejects(UnwritableEvent, encoder, event).attribute == "myext"
    event.get_attributes()["myext"] = "fine"
    event.get_attributes()["source"] = "now broken"
    assert rejects(UnwritableEvent, encoder, event).attribute == "source"


def test_control_characters_in_data_are_written() -> None:
    # The rule is about attributes: a JSON string in data may hold any character.
    event = CloudEvent(dict(BASE_EVENT), {"text": "line\r\nbreak\x00\x7f é"})
    for headers, body in (to_binary(event), to_structured(event), to_batch([event])):
        (decoded,) = from_http(headers, body)[1]
        assert decoded.get_data() == {"text": "line\r\nbreak\x00\x7f é"}


def test_strings_with_escapes_in_data_still_have_their_attributes_checked() -> None:
    # A body with a backslash or non-ASCII data takes the slow path: attributes still count.
    event = CloudEvent({**BASE_EVENT, "subject": "a\nb"}, {"text": 'q"\\ é'})
    assert rejects(UnwritableEvent, to_structured, event).attribute == "subject"
    good = CloudEvent({**BASE_EVENT, "subject": "é ok"}, {"text": 'q"\\ é'})
    (decoded,) = from_http(*to_structured(good))[1]
    assert decoded.get_subject() == "é ok"


def test_a_bad_event_in_a_batch_is_named() -> None:
    events = [sdk_event(id="1"), sdk_event(id="2", subject="x\ry"), sdk_event(id="3")]
    assert rejects(UnwritableEvent, to_batch, events).attribute == "subject"
    assert len(orjson.loads(to_batch([events[0], events[2]])[1])) == 2


def test_data_deeper_than_a_reader_takes_is_not_written() -> None:
    deep: Any = 1
    for _ in range(MAX_DATA_DEPTH + 1):
        deep = [deep]
    event = CloudEvent(dict(BASE_EVENT), deep)
    for encoder in ENCODERS:
        assert rejects(UnwritableEvent, encoder, event).attribute == "data"
    ok = CloudEvent(dict(BASE_EVENT), deep[0])
    for encoder in ENCODERS:
        (decoded,) = from_http(*encoder(ok))[1]
        assert decoded.get_data() == deep[0]


# -- what decoding costs ---------------------------------------------------------------------


def _filled(unit: bytes, size: int) -> bytes:
    """A JSON object of about ``size`` bytes: ``{"a": [unit, unit, ...]}``."""
    return b'{"a":[' + b",".join([unit] * max(1, (size - 8) // (len(unit) + 1))) + b"]}"


_SHAPES = {
    "empty arrays": b"[]",
    "empty objects": b"{}",
    "nested arrays": b"[" * 200 + b"]" * 200,
    "nested one-key objects": b'{"":' * 200 + b"{}" + b"}" * 200,
    "one-key objects": b'{"a":0}',
    "short strings": b'"a"',
    "floats": b"1.5",
    "big integers": b"1234567",
    "escaped text": b'"\\u00e9"',
    "astral text": '"a😀"'.encode(),
}


@pytest.mark.parametrize("size", [1000, 60_000, 1 << 20], ids=["1k", "60k", "1M"])
@pytest.mark.parametrize("unit", list(_SHAPES.values()), ids=list(_SHAPES))
def test_decoded_size_bounds_what_decoding_allocates(unit: bytes, size: int) -> None:
    # Issue 20.5: the sink's estimate (3x the body) was far below what some shapes cost.
    body = _filled(unit, size)
    tracemalloc.start()
    try:
        decoded = orjson.loads(body)
        allocated, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded["a"]
    assert allocated <= decoded_size(body), f"{allocated / len(body):.1f}x the body"


def test_decoded_size_of_an_ordinary_large_batch_is_not_the_worst_case() -> None:
    # Small events, many keys each: the upper bound counts every key as a new string.
    attributes = {"specversion": "1.0", "source": "/s", "type": "t", "subject": "orders/42"}
    events = [{**attributes, "id": str(n), "data": {"order": n, "paid": True}} for n in range(9000)]
    body = orjson.dumps(events)
    assert len(body) < decoded_size(body) < 20 * len(body) < decoded_size(_filled(b"[]", len(body)))
