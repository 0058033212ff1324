"""The wire format: CloudEvents to and from HTTP messages (pure functions, no I/O).

The CloudEvents HTTP protocol binding and JSON event format: it reads 1.0 and 0.3 (the SDK's
``v03`` event) and writes the version of the event it is given. Every refusal is a
``CodecError`` (a ``ValueError``) naming the attribute or rule, with ``.attribute`` and
``.status`` (400, or 415 for a format or charset it does not read).

Reading (``from_http``): Content-Type, in any case, picks the mode (batched, structured,
another ``application/cloudevents`` format is a 415, anything else binary); header names must
be lower-case. Events are validated as the core spec says, inventing nothing missing (the SDK's
constructor would add an id and a time). Binary header values are unquoted, then
percent-decoded once into UTF-8, keeping a stray ``%`` and raw UTF-8 (sdk-go does not
percent-encode; the HTTP layer gives its bytes as Latin-1). Data is the parsed JSON for a JSON
content type (or none, in the JSON format), a ``str`` for ``text/*``, else ``bytes``; data
nested deeper than ``MAX_DATA_DEPTH``, more than a batch can write, is refused.

Writing (``to_binary``, ``to_structured``, ``to_batch``, ``encode``): ``bytes`` data goes as it
is in binary mode, as ``data_base64`` in the JSON format; other data, with a JSON content type
or none, as JSON (a ``str`` as a JSON string: pass ``bytes`` for a serialised document). Header
values are percent-encoded as the binding says. An event the reading rules refuse, or whose
data does not fit its content type, is an ``UnwritableEvent`` before anything is sent.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import string
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal, NamedTuple
from urllib.parse import quote, unquote_to_bytes

import orjson
from cloudevents.core.v03.event import CloudEvent as CloudEventV03
from cloudevents.core.v1.event import CloudEvent

__all__ = [
    "TOKEN_CHARS",
    "AnyCloudEvent",
    "CodecError",
    "Mode",
    "decoded_size",
    "encode",
    "from_http",
    "to_batch",
    "to_binary",
    "to_structured",
    "with_extensions",
]

Mode = Literal["binary", "structured", "batch"]
AnyCloudEvent = CloudEvent | CloudEventV03

STRUCTURED_CONTENT_TYPE: Final = "application/cloudevents+json; charset=utf-8"
BATCH_CONTENT_TYPE: Final = "application/cloudevents-batch+json; charset=utf-8"
MAX_DATA_DEPTH: Final = 252  # orjson writes 254 levels; a batch adds two

_STRUCTURED_MEDIA: Final = "application/cloudevents+json"
_BATCH_MEDIA: Final = "application/cloudevents-batch+json"
_CE_PREFIX: Final = "application/cloudevents"
_FORMATS: Final[dict[str, Mode]] = {
    STRUCTURED_CONTENT_TYPE: "structured",
    _STRUCTURED_MEDIA: "structured",
    BATCH_CONTENT_TYPE: "batch",
    _BATCH_MEDIA: "batch",
}
_JSON_MEDIA: Final = "application/json"
_INT_MIN: Final = -(2**31)
_INT_MAX: Final = 2**31 - 1
_CACHE_LIMIT: Final = 512


class CodecError(ValueError):
    """A message that is not a CloudEvent this codec can read or write."""

    status: int = 400

    def __init__(self, message: str, attribute: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.attribute = attribute


class InvalidEvent(CodecError):
    """Not a valid CloudEvent (HTTP 400); the message names the attribute or rule."""


class UnsupportedContentType(CodecError):
    """An event format or charset this codec does not read (HTTP 415)."""

    status = 415


class UnwritableEvent(InvalidEvent):
    """An event that is not written because a receiver would refuse it (found before sending)."""


def _invalid(attribute: str, problem: str) -> InvalidEvent:
    return InvalidEvent(f"'{attribute}' {problem}", attribute)


def _show(value: Any) -> str:
    """A short rendering of an offending value for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Control characters, surrogates and noncharacters are not allowed in any String.
# ``str.isprintable()`` is true for nearly every valid value, so this regex only runs
# on the rare string containing a non-printable (but perhaps allowed) character.
_BAD_CHARS: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff"
    + "".join(f"{chr(p * 0x10000 + 0xFFFE)}{chr(p * 0x10000 + 0xFFFF)}" for p in range(1, 17))
    + "]"
)


def _check_chars(attribute: str, value: str) -> None:
    if not value.isprintable() and _BAD_CHARS.search(value) is not None:
        raise _invalid(attribute, "contains a control character, surrogate or noncharacter")


def _nonempty_str(attribute: str, value: Any) -> str:
    if type(value) is not str or not value:
        raise _invalid(attribute, f"must be a non-empty string, got {_show(value)}")
    _check_chars(attribute, value)
    return value


# Names, URIs and media types repeat from event to event: remember the good ones.
_GOOD_NAMES: set[str] = set()
_GOOD_URI_REFS: set[str] = set()
_GOOD_URIS: set[str] = set()


def _remember(cache: set[str], *values: str) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache.update(values)


def _check_name(name: str) -> None:
    if name in _GOOD_NAMES:
        return
    if name == "data":
        raise InvalidEvent("'data' is reserved and cannot be an attribute name", name)
    if not (name.isascii() and name.isalnum()) or name != name.lower():
        what = f"attribute name {_show(name)}" if name else "an attribute name"
        raise InvalidEvent(f"{what} must be lower-case letters a-z and digits 0-9", name)
    _remember(_GOOD_NAMES, name)


# RFC 3986: the characters a URI-reference may hold (percent signs checked apart).
_URI_CHARS: Final = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
_BAD_PERCENT: Final = re.compile("%(?![0-9A-Fa-f]{2})")


def _checked_uri(attribute: str, value: Any, absolute: bool) -> str:
    good = _GOOD_URIS if absolute else _GOOD_URI_REFS
    if type(value) is str and value in good:
        return value
    if type(value) is not str or not value:
        what = "URI" if absolute else "URI-reference"
        raise _invalid(attribute, f"must be a non-empty {what}, got {_show(value)}")
    if _URI_CHARS.fullmatch(value) is None:
        raise _invalid(attribute, f"is not a valid URI: bad character in {_show(value)}")
    if _BAD_PERCENT.search(value) is not None:
        raise _invalid(attribute, f"is not a valid URI: bad percent-encoding in {_show(value)}")
    # A colon before any '/', '?' or '#' ends a scheme, which has its own syntax.
    head = re.split("[/?#]", value, maxsplit=1)[0]
    if ":" in head:
        if _SCHEME.fullmatch(head.split(":", 1)[0]) is None:
            raise _invalid(attribute, f"is not a valid URI: bad scheme in {_show(value)}")
    elif absolute:
        raise _invalid(attribute, f"must be an absolute URI (with a scheme), got {_show(value)}")
    _remember(good, value)
    return value


_uri_reference: Final = functools.partial(_checked_uri, absolute=False)
_uri: Final = functools.partial(_checked_uri, absolute=True)

# RFC 9110 token characters: media types, parameter names, header names.
TOKEN_CHARS: Final = frozenset("!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters)


class _Media(NamedTuple):
    is_json: bool
    is_text: bool
    charset: str | None


_MEDIA_CACHE: dict[str, _Media] = {}
# RFC 9110: type "/" subtype *( OWS ";" OWS [ parameter ] ), parameter values a token or
# a quoted-string (empty parameters, as in "text/plain;", are tolerated).
_TOKEN: Final = "[" + re.escape("".join(sorted(TOKEN_CHARS))) + "]+"
_PARAMETER: Final = re.compile(rf'({_TOKEN})\s*=\s*(?:({_TOKEN})|"((?:[^"\\]|\\.)*)")')
_MEDIA_SYNTAX: Final = re.compile(
    rf"\s*({_TOKEN})/({_TOKEN})\s*((?:;\s*(?:{_PARAMETER.pattern}\s*)?)*)"
)


def _media(attribute: str, value: str) -> _Media:
    """What the codec needs to know of an RFC 2046 media type."""
    info = _MEDIA_CACHE.get(value)
    if info is not None:
        return info
    match = _MEDIA_SYNTAX.fullmatch(value) if value.isprintable() else None
    if match is None:
        raise _invalid(attribute, f"must be an RFC 2046 media type, got {_show(value)}")
    charset = None
    for name, token, quoted in _PARAMETER.findall(match[3]):
        if name.lower() == "charset":
            charset = token or quoted
    subtype = match[2].lower()
    is_json = subtype == "json" or subtype.endswith("+json")
    if len(_MEDIA_CACHE) >= _CACHE_LIMIT:
        _MEDIA_CACHE.clear()
    info = _MEDIA_CACHE[value] = _Media(is_json, match[1].lower() == "text", charset)
    return info


def _content_type(attribute: str, value: Any) -> str:
    if type(value) is not str or not value:
        raise _invalid(attribute, f"must be a non-empty media type, got {_show(value)}")
    _media(attribute, value)
    return value


def _media_of(datacontenttype: str | None) -> _Media:
    """The media of an event already built (absent means application/json)."""
    value = _JSON_MEDIA if datacontenttype is None else datacontenttype
    return _MEDIA_CACHE.get(value) or _media("datacontenttype", value)


def _timestamp(attribute: str, value: Any) -> datetime:
    """RFC 3339 ``date-time``: full date, ``T``, full time, fraction, ``Z`` or offset."""
    # datetime.fromisoformat is fast but takes more than RFC 3339 (week dates, ','
    # fractions, empty fractions, no offset, offsets without ':' or with seconds, but
    # not non-ASCII digits): the shape around it is checked here.
    if type(value) is str and value[4:17:3] == "--T::":
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            after_seconds = value[19]
            if value[-1] == "Z":
                if after_seconds == "Z" or (after_seconds == "." and len(value) > 21):
                    return parsed
            elif (
                value[-6] in "+-"
                and value[-3] == ":"
                and ((after_seconds == "." and len(value) > 26) or len(value) == 25)
            ):
                return parsed
    if type(value) is str and len(value) > 10 and (value[10] == "t" or value[-1] == "z"):
        return _timestamp(attribute, value.upper())  # RFC 3339 allows lower-case t and z
    raise _invalid(attribute, f"must be an RFC 3339 timestamp, got {_show(value)}")


def _json_time(value: datetime) -> datetime:
    """A time orjson writes as RFC 3339 (``Z`` for UTC, four times faster than isoformat)."""
    if value.tzinfo is UTC:
        return value
    offset = value.utcoffset()
    if offset is None:  # the SDK forbids naive times; should one come, it is UTC
        return value.replace(tzinfo=UTC)
    # RFC 3339 has no seconds in offsets (orjson would round them): write it in UTC.
    return value.astimezone(UTC) if offset.seconds % 60 else value


_Check = Callable[[str, Any], Any]
_CHECKS_V1: Final[dict[str, _Check]] = {
    "specversion": _nonempty_str,
    "id": _nonempty_str,
    "source": _uri_reference,
    "type": _nonempty_str,
    "datacontenttype": _content_type,
    "dataschema": _uri,
    "subject": _nonempty_str,
    "time": _timestamp,
}
_CHECKS_V03: Final[dict[str, _Check]] = {
    **{name: check for name, check in _CHECKS_V1.items() if name != "dataschema"},
    "datacontentencoding": _nonempty_str,
    "schemaurl": _uri_reference,
}

# How the hot loops handle each context attribute without a call in the common case.
_STR, _URI_REF, _MEDIA_TYPE, _TIME, _ABS_URI = range(5)
_KIND_OF_CHECK: Final[dict[_Check, int]] = {
    _nonempty_str: _STR,
    _uri_reference: _URI_REF,
    _content_type: _MEDIA_TYPE,
    _timestamp: _TIME,
    _uri: _ABS_URI,
}


class _Spec(NamedTuple):
    checks: dict[str, _Check]
    kinds: dict[str, int]
    # Typed as the 1.0 class, the type callers see; the 0.3 class has the same methods.
    event_type: type[CloudEvent]


def _make_spec(checks: dict[str, _Check], event_type: Any) -> _Spec:
    return _Spec(checks, {name: _KIND_OF_CHECK[c] for name, c in checks.items()}, event_type)


_SPEC_V1: Final = _make_spec(_CHECKS_V1, CloudEvent)
_SPEC_V03: Final = _make_spec(_CHECKS_V03, CloudEventV03)
_SPECS: Final = {"1.0": _SPEC_V1, "0.3": _SPEC_V03}


def _spec_for(value: Any) -> _Spec:
    spec = _SPEC_V1 if value == "1.0" else _SPECS.get(value) if type(value) is str else None
    if spec is None:
        problem = f"{_show(value)} is not supported (use 1.0 or 0.3)"
        raise _invalid("specversion", "is required" if value is None else problem)
    return spec


def _extension(name: str, value: Any) -> Any:
    """An extension value: String, Boolean or Integer (URIs and times are strings)."""
    _check_name(name)
    kind = type(value)
    if kind is str:
        _check_chars(name, value)
        return value
    if kind is bool or (kind is int and _INT_MIN <= value <= _INT_MAX):
        return value
    if kind is int:
        raise _invalid(name, f"integer {value} is outside the 32-bit range")
    raise _invalid(name, f"must be a string, boolean or integer, got {_show(value)}")


def _new_event(event_type: type[Any], attributes: dict[str, Any], data: Any) -> CloudEvent:
    # The SDK constructor fills in a missing id, specversion and time; a receiver must
    # not invent them, so the attributes (validated here) are set without it.
    event: CloudEvent = object.__new__(event_type)
    event._attributes = attributes
    event._data = data
    return event


_MISSING: Final = object()


def _loads(body: bytes | str, what: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(
            f"{what} is not valid JSON: {exc}", "data" if what == "data" else None
        ) from None


def _check_depth(data: Any) -> None:
    """Refuse data nested deeper than orjson can write back inside a batch."""
    if type(data) is dict or type(data) is list:
        try:
            orjson.dumps([[data]])  # the exact test, and C-fast: only depth can fail it here
        except TypeError:
            raise _invalid("data", f"is nested deeper than {MAX_DATA_DEPTH} levels") from None


def _b64decode(attribute: str, value: Any) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise _invalid(attribute, "must be a valid base64 string") from None


def _event_from_json(obj: Any, deep: bool, batch_spec: _Spec | None = None) -> CloudEvent:
    """A JSON-format event; ``deep``: check nesting; ``batch_spec``: the batch's specversion."""
    if type(obj) is not dict:
        raise InvalidEvent(f"a CloudEvent must be a JSON object, got {type(obj).__name__}")
    spec = _spec_for(obj.get("specversion"))
    if batch_spec is not None and spec is not batch_spec:
        raise InvalidEvent("all events of a batch must have the same specversion", "specversion")
    kinds = spec.kinds
    attributes: dict[str, Any] = {}
    data: Any = _MISSING
    data_base64: Any = _MISSING
    # This loop is the hot path of a sink: the common cases (printable strings, names,
    # URIs and media types seen before) are inlined; anything else goes to its check.
    for name, value in obj.items():
        kind = kinds.get(name)
        if type(value) is str:
            if kind == _STR:
                if value and value.isprintable():
                    attributes[name] = value
                    continue
            elif kind is None:
                if name in _GOOD_NAMES and value.isprintable():
                    attributes[name] = value
                    continue
            elif kind == _TIME:
                attributes[name] = _timestamp(name, value)
                continue
            elif kind == _URI_REF:
                if value in _GOOD_URI_REFS:
                    attributes[name] = value
                    continue
            elif kind == _MEDIA_TYPE and value in _MEDIA_CACHE:
                attributes[name] = value
                continue
        elif value is None:
            continue  # null is unset
        # Not a common case: the full check (which raises when the value is bad).
        if kind is not None:
            attributes[name] = spec.checks[name](name, value)
        elif name == "data":
            data = value
        elif name == "data_base64" and spec is _SPEC_V1:
            data_base64 = value
        else:
            attributes[name] = _extension(name, value)
    if data_base64 is not _MISSING:
        if data is not _MISSING:
            raise InvalidEvent("'data' and 'data_base64' are mutually exclusive", "data")
        data = _b64decode("data_base64", data_base64)
    elif data is _MISSING:
        data = None
    else:
        contenttype = attributes.get("datacontenttype")
        encoding = attributes.get("datacontentencoding")
        if spec is _SPEC_V03 and encoding is not None and encoding.lower() == "base64":
            data = _b64decode("data", data)
        elif contenttype is not None and not _media("datacontenttype", contenttype).is_json:
            if type(data) is not str:
                raise _invalid("data", f"must be a string for datacontenttype {_show(contenttype)}")
        elif deep:
            _check_depth(data)
    if "id" not in attributes or "source" not in attributes or "type" not in attributes:
        _missing_required(attributes)
    return _new_event(spec.event_type, attributes, data)


def _missing_required(attributes: dict[str, Any]) -> None:
    for name in ("id", "source", "type"):
        if name not in attributes:
            raise _invalid(name, "is required")


def _might_be_deep(body: bytes) -> bool:
    # Nesting depth never exceeds the number of opening brackets: a cheap upper bound.
    return len(body) > 2 * MAX_DATA_DEPTH and (body.count(b"[") + body.count(b"{") > MAX_DATA_DEPTH)


def _decode_batch(body: bytes) -> list[CloudEvent]:
    items = _loads(body, "batch")
    if type(items) is not list:
        raise InvalidEvent(f"a batch must be a JSON array, got {type(items).__name__}")
    first = items[0] if items else None
    spec = _spec_for(first.get("specversion")) if type(first) is dict else None
    events = [_event_from_json(item, False, spec) for item in items]
    for event in events:
        data: Any = event._data  # what the JSON held, whatever the SDK's annotation says
        if type(data) is dict or type(data) is list:
            # Each event's data is two levels down, as in _check_depth's [[data]]: one
            # dump of the whole batch checks them all, faster than one per event.
            try:
                orjson.dumps(items)
            except TypeError:
                raise _invalid("data", f"is nested deeper than {MAX_DATA_DEPTH} levels") from None
            break
    return events


_QUOTED: Final = re.compile(r'"((?:[^"\\]|\\.)*)"')
_QUOTED_PAIR: Final = re.compile(r"\\(.)")


def _percent_decode(attribute: str, raw: bytes) -> str:
    try:
        return unquote_to_bytes(raw).decode("utf-8")  # a '%' that starts no escape stays
    except UnicodeDecodeError:
        raise _invalid(attribute, "header is not valid UTF-8 once percent-decoded") from None


def _header_value(attribute: str, value: str) -> str:
    if value[:1] == '"':  # an RFC 7230 quoted-string: undo its backslash escapes
        match = _QUOTED.fullmatch(value)
        if match is None:
            raise _invalid(attribute, "header has a malformed quoted-string")
        value = _QUOTED_PAIR.sub(r"\1", match[1])
    if value.isascii():
        return _percent_decode(attribute, value.encode()) if "%" in value else value
    # Raw UTF-8 from a sender that does not percent-encode (sdk-go), which the HTTP layer
    # hands over as Latin-1 code points; else text a layer has decoded already.
    try:
        return _percent_decode(attribute, value.encode("latin-1"))
    except (UnicodeEncodeError, InvalidEvent):
        return _percent_decode(attribute, value.encode("utf-8", "surrogatepass"))


def _decode_binary(headers: Mapping[str, str], contenttype: str | None, body: bytes) -> CloudEvent:
    raw_version = headers.get("ce-specversion")
    if raw_version is None:
        raise InvalidEvent(
            "not a CloudEvent: the 'ce-specversion' header is missing", "specversion"
        )
    spec = _spec_for(_header_value("specversion", raw_version))
    kinds = spec.kinds
    attributes: dict[str, Any] = {}
    for key, value in headers.items():
        if key[:3] != "ce-":
            continue
        name = key[3:]
        # Fast path: an ASCII value with no '%' and no quotes needs no decoding.
        if not value.isascii() or "%" in value or value[:1] == '"':
            value = _header_value(name, value)
        kind = kinds.get(name)
        if kind is None:
            if name in _GOOD_NAMES and value.isprintable():
                attributes[name] = value
            else:
                attributes[name] = _extension(name, value)
        elif kind == _STR and value and value.isprintable():
            attributes[name] = value
        elif kind == _TIME:
            attributes[name] = _timestamp(name, value)
        elif kind == _URI_REF and value in _GOOD_URI_REFS:
            attributes[name] = value
        elif kind == _MEDIA_TYPE:
            raise _invalid(name, "must travel as Content-Type, not as ce-datacontenttype")
        else:
            attributes[name] = spec.checks[name](name, value)
    data: Any = body or None
    if contenttype is not None:
        media = _media("datacontenttype", contenttype)
        attributes["datacontenttype"] = contenttype
        data = _binary_data(media, body) if body else None
    if "id" not in attributes or "source" not in attributes or "type" not in attributes:
        _missing_required(attributes)
    return _new_event(spec.event_type, attributes, data)


def _binary_data(media: _Media, body: bytes) -> Any:
    if media.is_json:
        data = _loads(body, "data")
        if _might_be_deep(body):
            _check_depth(data)
        return data
    if media.is_text:
        try:
            return body.decode(media.charset or "utf-8")
        except LookupError:
            raise UnsupportedContentType(
                f"unknown charset {_show(media.charset)} in Content-Type", "datacontenttype"
            ) from None
        except UnicodeDecodeError:
            raise _invalid("data", f"is not valid {media.charset or 'utf-8'} text") from None
    return body


#: What decoding costs, in bytes of Python objects (CPython 3.11-3.13, 64-bit, measured
#: with tracemalloc, rounded up): per byte of a small body at worst (a list per "[]", a
#: one-key dict per '{"":}' nested), and per structural character of a larger one.
_WORST_PER_BYTE: Final = 40
_SCANNED_FROM: Final = 64 * 1024
_COST_OF: Final = {ord("["): 72, ord("{"): 80, ord(":"): 128, ord(","): 40, ord('"'): 16}
_NOT_COUNTED: Final = bytes(c for c in range(256) if c not in _COST_OF and c != ord("\\"))


def decoded_size(body: bytes) -> int:
    """An upper bound of the memory the JSON decoded from ``body`` takes, for any body:
    Python objects cost up to 40 times the JSON they come from (empty lists, one-key
    dicts), about 4 times for ordinary events. A body over 64 KiB is charged by its
    structure, found in one pass over it (a tenth of what decoding it takes)."""
    size = len(body)
    if size <= _SCANNED_FROM:
        return size * _WORST_PER_BYTE
    structure = body.translate(None, _NOT_COUNTED)
    # Text is 1 byte a character, but 4 for a string holding one astral character.
    cost = size if body.isascii() and b"\\" not in structure else 4 * size
    for char, each in _COST_OF.items():
        cost += structure.count(char) * each
    return cost


def from_http(headers: Mapping[str, str], body: bytes) -> tuple[Mode, list[CloudEvent]]:
    """Decode an HTTP request (lower-case header names) into its mode and events: one
    event in binary and structured mode, a list (maybe empty) for a batch."""
    contenttype = headers.get("content-type") or None  # an empty one says nothing
    mode = _FORMATS.get(contenttype or "")  # the usual values, before anything is parsed
    if mode is None and contenttype is not None and contenttype[:23].lower() == _CE_PREFIX:
        media = contenttype.split(";", 1)[0].strip().lower()
        mode = _FORMATS.get(media)
        if mode is None:
            raise UnsupportedContentType(
                f"event format {_show(media)} is not supported; "
                f"use {_STRUCTURED_MEDIA} or {_BATCH_MEDIA}"
            )
    if mode == "structured":
        return mode, [_event_from_json(_loads(body, "structured event"), _might_be_deep(body))]
    if mode == "batch":
        return mode, _decode_batch(body)
    return "binary", [_decode_binary(headers, contenttype, body)]


def with_extensions(event: AnyCloudEvent, extensions: Mapping[str, Any]) -> CloudEvent:
    """A copy of ``event`` with these extensions set (``None`` removes one), checked as
    ``from_http`` checks them; none may be a context attribute of the version."""
    attributes = dict(event.get_attributes())
    spec = _spec_for(attributes.get("specversion"))
    for name, value in extensions.items():
        if type(name) is not str:
            raise InvalidEvent(f"extension names must be strings, got {_show(name)}")
        if name in spec.checks:
            raise _invalid(name, "is a context attribute, not an extension")
        if value is None:
            _check_name(name)
            attributes.pop(name, None)
        else:
            attributes[name] = _extension(name, value)
    return _new_event(type(event), attributes, event.get_data())


# Names of events written before: their values need no check but the SDK's own and the
# character check where they are written (header or JSON body). The URIs dataschema and
# schemaurl always get one.
_WRITABLE_NAMES: set[str] = set()


def _check_writable(attributes: dict[str, Any]) -> None:
    """Refuse what the decoder would refuse, so that a bad event fails before it is sent."""
    if (
        _WRITABLE_NAMES.issuperset(attributes)
        and attributes.get("source") in _GOOD_URI_REFS
        and attributes.get("datacontenttype", _JSON_MEDIA) in _MEDIA_CACHE
    ):
        return
    spec = _spec_for(attributes.get("specversion"))
    for name, value in attributes.items():
        check = spec.checks.get(name)
        if value is None or (check is _timestamp and isinstance(value, datetime)):
            continue
        if check is not None:
            check(name, value)
        elif isinstance(value, (bytes, bytearray, datetime)):
            _check_name(name)  # written as its base64 or RFC 3339 string
        else:
            _extension(name, value)
    _missing_required(attributes)
    _media_of(attributes.get("datacontenttype"))
    _remember(_WRITABLE_NAMES, *(attributes.keys() - {"dataschema", "schemaurl"}))


def _text_of(attribute: str, value: Any) -> str:
    """The canonical string of an attribute value that is not a ``str``."""
    kind = type(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(_extension(attribute, value))  # in the 32-bit range
    if isinstance(value, datetime):
        return orjson.dumps(_json_time(value), option=orjson.OPT_UTC_Z)[1:-1].decode()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    raise _invalid(attribute, f"cannot be written: {type(value).__name__} is not a CE type")


# What quote() leaves as it is in a header value: U+0021-U+007E but '"' and '%'.
_HEADER_SAFE: Final = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in '"%')


def _dumps(value: Any, what: str) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_UTC_Z)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise _invalid("data", f"cannot be written as JSON ({what}): {exc}") from None


def _body_of(event: AnyCloudEvent) -> tuple[str | None, bytes]:
    """Content-Type and body of binary mode."""
    data = event.get_data()
    contenttype = event.get_datacontenttype()
    media = _media_of(contenttype)
    if data is None:
        return contenttype, b""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return contenttype, bytes(data)
    if media.is_json:
        body = _dumps(data, "binary body")
        if _might_be_deep(body):
            _check_depth(data)  # orjson writes deeper data than a reader takes
        return contenttype or _JSON_MEDIA, body
    if type(data) is not str:
        raise _invalid("data", f"must be str or bytes for datacontenttype {_show(contenttype)}")
    charset = (media.charset or "utf-8") if media.is_text else "utf-8"
    try:
        return contenttype, data.encode(charset)
    except LookupError:
        raise UnsupportedContentType(
            f"unknown charset {_show(charset)} in datacontenttype", "datacontenttype"
        ) from None
    except UnicodeEncodeError:
        raise _invalid("data", f"cannot be encoded as {charset}") from None


def to_binary(event: AnyCloudEvent) -> tuple[dict[str, str], bytes]:
    """Headers (lower-case names) and body of ``event`` in binary mode."""
    headers: dict[str, str] = {}
    try:
        attributes = event.get_attributes()
        _check_writable(attributes)
        for name, value in attributes.items():
            # 0.3's datacontentencoding describes the JSON form of data; the body of
            # binary mode is always the raw bytes.
            if value is None or name == "datacontenttype" or name == "datacontentencoding":
                continue
            text = value if type(value) is str else _text_of(name, value)
            # For ASCII, isprintable() is U+0020-U+007E: encode space, '"', '%' and the rest.
            if (
                not (text.isascii() and text.isprintable())
                or " " in text
                or '"' in text
                or "%" in text
            ):
                _check_chars(name, text)
                text = quote(text, safe=_HEADER_SAFE)
            headers["ce-" + name] = text
        contenttype, body = _body_of(event)
    except CodecError as exc:
        raise UnwritableEvent(exc.message, exc.attribute) from None
    if contenttype is not None:
        headers["content-type"] = contenttype
    return headers, body


def _json_object(event: AnyCloudEvent) -> dict[str, Any]:
    """The JSON-format object of ``event``, for ``_json_body`` to write (times native)."""
    attributes = event.get_attributes()
    _check_writable(attributes)
    out: dict[str, Any] = {}
    for name, value in attributes.items():
        kind = type(value)
        if (
            kind is str
            or kind is bool
            or (kind is datetime and value.tzinfo is UTC)
            or (kind is int and _INT_MIN <= value <= _INT_MAX)
        ):
            out[name] = value
        elif isinstance(value, datetime):
            out[name] = _json_time(value)
        elif value is not None:
            out[name] = _text_of(name, value)
    data = event.get_data()
    if "datacontentencoding" in out and attributes.get("specversion") == "0.3":
        del out["datacontentencoding"]
    if data is None:
        return out
    if isinstance(data, (bytes, bytearray, memoryview)):
        encoded = base64.b64encode(data).decode("ascii")
        if attributes.get("specversion") == "0.3":
            out.update(datacontentencoding="base64", data=encoded)
        else:
            out["data_base64"] = encoded
        return out
    contenttype = attributes.get("datacontenttype")
    if contenttype is not None and not _media_of(contenttype).is_json and type(data) is not str:
        raise _invalid("data", f"must be str or bytes for datacontenttype {_show(contenttype)}")
    out["data"] = data
    return out


def _json_body(events: Sequence[AnyCloudEvent], value: Any, what: str) -> bytes:
    """``value`` (the objects of ``events``) as JSON, its strings checked for characters."""
    body = _dumps(value, what)
    # orjson escapes C0 controls with a backslash and writes anything else as it is: an
    # ASCII body with no backslash and no DEL has no bad character in any string.
    if not body.isascii() or body.find(b"\\") >= 0 or body.find(b"\x7f") >= 0:
        for event in events:
            for name, text in event.get_attributes().items():
                if type(text) is str:
                    _check_chars(name, text)
    return body


def to_structured(event: AnyCloudEvent) -> tuple[dict[str, str], bytes]:
    """Headers and body of ``event`` in structured mode (JSON format)."""
    try:
        obj = _json_object(event)
        body = _json_body((event,), obj, "structured")
        if _might_be_deep(body) and "data" in obj:
            _check_depth(obj["data"])  # orjson writes deeper data than a reader takes
    except CodecError as exc:
        raise UnwritableEvent(exc.message, exc.attribute) from None
    return {"content-type": STRUCTURED_CONTENT_TYPE}, body


def to_batch(events: Sequence[AnyCloudEvent]) -> tuple[dict[str, str], bytes]:
    """Headers and body of ``events`` as one JSON batch (all of one specversion)."""
    try:
        objects = [_json_object(event) for event in events]
        if len({obj.get("specversion") for obj in objects}) > 1:
            raise _invalid("specversion", "must be the same for all events of a batch")
        # orjson's own limit refuses data nested deeper than a reader takes.
        body = _json_body(events, objects, "batch")
    except CodecError as exc:
        raise UnwritableEvent(exc.message, exc.attribute) from None
    return {"content-type": BATCH_CONTENT_TYPE}, body


def encode(events: Sequence[AnyCloudEvent], mode: Mode) -> tuple[dict[str, str], bytes]:
    """Headers and body for ``events`` in ``mode`` (binary and structured take one)."""
    if mode == "batch":
        return to_batch(events)
    if mode != "binary" and mode != "structured":
        raise CodecError(f"unknown mode {_show(mode)}; use binary, structured or batch")
    if len(events) != 1:
        raise CodecError(f"{mode} mode carries exactly one event, got {len(events)}")
    return to_binary(events[0]) if mode == "binary" else to_structured(events[0])
