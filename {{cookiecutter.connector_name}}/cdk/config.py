"""Configuration: where config.yml and secret.yml come from, and what they may say.

``load_config`` finds the files, deep-merges the secret over the config, applies the
environment fallbacks and validates the result with the connector's pydantic model.
Every problem becomes one line of a :class:`ConfigError` naming the field, secrets masked.
"""

from __future__ import annotations

import importlib.util
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretBytes,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from cdk.signature import standard_key

__all__ = [
    "ENVIRONMENT",
    "ETCD_SCHEMES",
    "ConfigError",
    "ConnectorConfig",
    "DeliveryConfig",
    "ServerConfig",
    "SinkConfig",
    "SourceConfig",
    "WebhookSourceConfig",
    "load_config",
    "masked_dump",
    "parse_etcd_url",
    "parse_redis_url",
    "redact_url",
    "resolve_paths",
]

#: Every environment variable the kit reads: (name, the config key it stands in for when
#: both files lack it, or None, what it does). Fallbacks are tried in this order.
ENVIRONMENT: tuple[tuple[str, str | None, str], ...] = (
    ("CONNECTOR_CONFIG", None, "config file when --config is not given (default ./config.yml)"),
    (
        "CONNECTOR_SECRET",
        None,
        "secret file when --secret is not given (default ./secret.yml); either is used"
        " when it exists (an image may mount none), deep-merged over the config",
    ),
    ("CONNECTOR_TARGET", "target", "source: target URL when the config has no `target`"),
    ("K_SINK", "target", "source: target URL when neither the config nor CONNECTOR_TARGET set it"),
    ("CONNECTOR_PORT", "port", "sink, webhook source: port when the config has no `port`"),
    ("LOG_LEVEL", "log_level", "log level when the config has no `log_level` (default INFO)"),
    ("K_CE_OVERRIDES", None, 'source: JSON {"extensions": {"name": "value"}} set on every event'),
    ("K_CA_CERTS", None, "source: PEM certificates trusted for an https:// target (Knative's)"),
)

#: Config key -> the environment variables that stand in for it, in order.
ENV_FALLBACKS: dict[str, tuple[str, ...]] = {
    key: tuple(name for name, k, _ in ENVIRONMENT if k == key) for _, key, _ in ENVIRONMENT if key
}

C = TypeVar("C", bound="ConnectorConfig")

#: Shorter values are not masked in messages: masking them would garble ordinary words.
_MIN_REDACTED_LENGTH = 4
_MASK = "**********"


def redact_url(url: str) -> str:
    """``url`` with any password or ``access_token`` in it masked, fit for logs and errors."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            host = parts.hostname or ""
            if ":" in host:  # an IPv6 literal keeps its brackets
                host = f"[{host}]"
            netloc = f"{parts.username or ''}:{_MASK}@{host}"
            if parts.port is not None:
                netloc += f":{parts.port}"
        query = "&".join(
            f"{pair.partition('=')[0]}={_MASK}"
            if pair.partition("=")[0].lower() == "access_token"
            else pair
            for pair in parts.query.split("&")
        )
    except ValueError:
        return _MASK
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


#: ``position_store`` values that select the etcd backend (:mod:`cdk.etcd`).
ETCD_SCHEMES = ("etcd://", "etcds://")
#: Fields holding an http(s) URL: checked as one at load, credentials masked when shown.
_URL_FIELDS = ("target", "dead_letter_target")
#: Fields holding a URL whose credentials are masked when shown.
_SHOWN_URL_FIELDS = (*_URL_FIELDS, "dedupe_store")


def parse_etcd_url(url: str) -> tuple[bool, list[tuple[str, int]], str]:
    """``etcd[s]://HOST:PORT[,HOST:PORT...]/PREFIX`` as (TLS, endpoints, ``/PREFIX``)."""
    scheme, _, rest = url.partition("://")
    hosts, _, prefix = rest.partition("/")
    if f"{scheme}://" not in ETCD_SCHEMES:
        raise ValueError(f"must be a file path or an etcd:// or etcds:// URL, not {scheme}://")
    if "@" in hosts:
        raise ValueError("must not hold credentials: set etcd_username and etcd_password")
    if not prefix.strip("/") or any(char in prefix for char in "?#"):
        raise ValueError(f"needs a key prefix: {scheme}://HOST:PORT[,HOST:PORT...]/PREFIX")
    endpoints = []
    for endpoint in hosts.split(","):
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"endpoint {endpoint!r} is not HOST:PORT")
        endpoints.append((host.strip("[]"), int(port)))
    return scheme == "etcds", endpoints, "/" + prefix.strip("/")


def _checked_http_url(value: str | None) -> str | None:
    if value is None:
        return None
    shown = redact_url(value)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError(f"is not a valid URL (bad host or port): {shown!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {shown!r}")
    return value


def parse_redis_url(url: str) -> tuple[str, int, int]:
    """``redis://HOST:PORT/DB`` as (host, port, db); ``ValueError`` says what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"is not a valid URL (bad host or port): {redact_url(url)!r}") from None
    db = parts.path.strip("/") or "0"
    if parts.scheme != "redis" or not parts.hostname or port is None or not db.isdigit():
        raise ValueError(f"must be redis://HOST:PORT/DB, got {redact_url(url)!r}")
    return parts.hostname, port, int(db)


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one readable line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class ConnectorConfig(BaseModel):
    """Keys every connector understands. Unknown keys are errors, so typos surface."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Log level (fallback `$LOG_LEVEL`)."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="`text` for people, `json` for one JSON object per line."
    )
    grace_period: float = Field(
        8.0,
        ge=0,
        description="Seconds a shutdown may take to finish in-flight work (after "
        "`shutdown_delay`); with it, under Docker's 10 s and Kubernetes' 30 s stop timeouts.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    #: What secret.yml held and secret-typed fields hold: masked wherever shown.
    _masked_values: list[str] | None = PrivateAttr(default=None)
    #: Where each key with an environment fallback came from (set by ``load_config``).
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)
    #: What ``load_config`` found worth a WARNING once logging is set up.
    _warnings: list[str] = PrivateAttr(default_factory=list)

    def origin(self, key: str) -> str:
        """Where ``key``'s value came from: the file's name, ``$VARIABLE``, or ``default``."""
        return self._origins.get(key, "default")

    @property
    def load_warnings(self) -> list[str]:
        """Lines worth a WARNING about how the configuration was written."""
        return list(self._warnings)

    def redact(self, text: str) -> str:
        """``text`` with every configured secret masked: for logs, errors and answers (a
        target echoing its request must not leak the token through an excerpt)."""
        if self._masked_values is None:
            self._masked_values = _secret_values(type(self), self.model_dump(), {})
        return _redact(text, self._masked_values) if self._masked_values else text


def _not_blank(value: SecretStr | None) -> SecretStr | None:
    # An empty token would quietly turn auth off; leaving the key out says so plainly.
    if value is not None and not value.get_secret_value().strip():
        raise ValueError("must not be empty (leave the key out to turn auth off)")
    return value


def _header_safe(value: SecretStr | None) -> SecretStr | None:
    # A bearer token goes into a request header: anything else would fail every request.
    if value is not None and not all(" " <= c <= "~" for c in value.get_secret_value()):
        raise ValueError("must be printable ASCII (no line breaks or other characters)")
    return _not_blank(value)


Secret = Annotated[SecretStr | None, AfterValidator(_not_blank)]
BearerToken = Annotated[SecretStr | None, AfterValidator(_header_safe)]


class ServerConfig(ConnectorConfig):
    """Keys of the HTTP server a sink (or a webhook source) runs."""

    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(
        8080, ge=0, le=65535, description="Port to listen on (fallback `$CONNECTOR_PORT`)."
    )
    auth_token: BearerToken = Field(
        None, description="POSTs need `Authorization: Bearer <token>` or `?access_token=<token>`."
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=64 * 1024, description="Largest request body accepted (413 above)."
    )
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="Largest request head accepted (431 above)."
    )
    read_timeout: float = Field(
        10.0, gt=0, description="Seconds a client may take to send one whole request."
    )
    keepalive_timeout: float = Field(
        75.0, gt=0, description="Seconds an idle keep-alive connection stays open."
    )
    max_concurrency: int = Field(
        256, ge=1, description="Requests handled at once; more get 429 with Retry-After."
    )
    max_bytes_in_flight: int = Field(
        64 * 1024 * 1024,
        ge=64 * 1024,
        description="Bytes requests in progress may hold (bodies, decoded events); more get 503.",
    )
    access_log: bool = Field(
        False, description="One line per request on the `cdk.access` logger (status, duration...)."
    )
    shutdown_delay: float = Field(
        0.0,
        ge=0,
        le=300,
        description="Seconds it keeps serving after SIGTERM, `/readyz` answering 503, before "
        "it stops accepting and drains (Kubernetes takes a moment to stop routing here).",
    )


class DeliveryConfig(ConnectorConfig):
    """Keys of every source: where events go and how hard delivery tries."""

    target: str = Field(
        ..., description="URL events are POSTed to (fallback `$CONNECTOR_TARGET`, then `$K_SINK`)."
    )
    target_auth_token: BearerToken = Field(
        None, description="The target's `auth_token`, sent as `Authorization: Bearer <token>`."
    )
    send_event_attempts: int = Field(
        3, description="Attempts per event; 0 or less retries until delivered or shut down."
    )
    batch_size: int = Field(
        1, ge=1, le=10_000, description="Events per request; above 1 sends batched mode."
    )
    content_mode: Literal["binary", "structured"] = Field(
        "binary", description="How single events are sent: `binary` or `structured`."
    )
    max_in_flight: int = Field(
        16, ge=1, le=1024, description="Requests in flight at once; 1 keeps strict order."
    )
    batch_linger: float = Field(
        0.005, ge=0, le=10, description="Seconds a partial batch waits for more events."
    )
    attempt_timeout: float = Field(5.0, gt=0, description="Seconds one delivery attempt may take.")
    retry_backoff: float = Field(
        0.5,
        ge=0,
        description="Seconds before the first retry while every attempt fails (times the "
        "square of the failing share: scattered failures wait less); grows with jitter.",
    )
    retry_backoff_max: float = Field(5.0, ge=0, description="Longest wait between two attempts.")
    retry_after_max: float = Field(
        60.0, ge=0, description="Longest `Retry-After` honoured, in seconds."
    )
    queue_size: int = Field(
        1000, ge=1, description="Events in `chan` or waiting for a retry before the producer waits."
    )
    dead_letter_target: str | None = Field(
        None,
        description="URL an event that cannot be delivered goes to, with the Knative "
        "extensions `knativeerrordest`, `knativeerrorcode` and `knativeerrordata`.",
    )
    dead_letter_auth_token: BearerToken = Field(
        None, description="Sent to `dead_letter_target` as `Authorization: Bearer <token>`."
    )
    target_ca_file: str | None = Field(
        None, description="PEM file of CAs trusted for an https:// target (and `$K_CA_CERTS`)."
    )

    @field_validator("target_ca_file")
    @classmethod
    def _ca_file(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=value)
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot be read as PEM certificates: {exc}") from None
        return value

    @field_validator(*_URL_FIELDS)
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return _checked_http_url(value)


class SourceConfig(DeliveryConfig):
    """Keys of a polling source: delivery, plus how it polls and where it keeps positions."""

    interval: float = Field(
        1.0, ge=0, description="Seconds between two calls of `make_event` (the kit's loop)."
    )
    idle_interval: float | None = Field(
        None,
        ge=0,
        description="Seconds after a call of `make_event` that returned nothing (None or `[]`);"
        " unset: `interval`.",
    )
    partition_refresh: float = Field(
        60.0, gt=0, description="Seconds between two calls of `partitions()` (when defined)."
    )
    host: str = Field("0.0.0.0", description="Address `metrics_port` listens on.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve /metrics, /healthz and /readyz on this port."
    )
    position_store: str | None = Field(
        None,
        description="Where positions are kept across restarts: an SQLite file, or "
        "`etcd://HOST:PORT[,HOST:PORT...]/PREFIX` (`etcds://` for TLS); unset: in memory.",
    )
    etcd_username: str | None = Field(
        None, description="User for an etcd `position_store` with auth on (in secret.yml too)."
    )
    etcd_password: Secret = Field(None, description="Password of `etcd_username`.")
    etcd_ca_file: str | None = Field(
        None, description="PEM file of CAs an `etcds://` store's certificate is checked against."
    )
    leader_election: bool = Field(
        False,
        description="Replicas campaign for one etcd lease; only the leader produces events. "
        "With `partitions()`, each partition has one leader, a fair share each.",
    )
    leader_lease: float = Field(
        10.0,
        ge=2,
        le=3600,
        description="Seconds a lease lasts: a leader unable to renew it stops, another takes over.",
    )

    @field_validator("position_store")
    @classmethod
    def _file_or_etcd(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (leave the key out to keep positions in memory)")
        if value is not None and "://" in value:
            parse_etcd_url(value)
        return value

    @field_validator("leader_election")
    @classmethod
    def _election_needs_etcd(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not str(info.data.get("position_store")).startswith(ETCD_SCHEMES):
            raise ValueError("needs an etcd:// or etcds:// position_store (the lease lives there)")
        return value


class SinkConfig(ServerConfig):
    """Keys of a sink."""

    dead_letter_target: str | None = Field(
        None,
        description="URL an event goes to when `arrived` refused it for good (a 4xx other "
        "than 408 and 429) or raised, with the Knative extensions `knativeerrordest`, "
        "`knativeerrorcode` and `knativeerrordata`; it then counts as handled.",
    )
    dead_letter_auth_token: BearerToken = Field(
        None, description="Sent to `dead_letter_target` as `Authorization: Bearer <token>`."
    )
    dedupe_window: float = Field(
        0.0,
        ge=0,
        description="Seconds an event's (source, id) is remembered once handled: within it, "
        "the same event is acknowledged again without calling `arrived`. 0: off.",
    )
    dedupe_store: str | None = Field(
        None,
        description="Where `dedupe_window` remembers events: unset, in memory (bounded); an "
        "SQLite file (kept across restarts); `redis://HOST:PORT/DB` (shared by replicas; "
        "the `redis` extra).",
    )

    @field_validator("dead_letter_target")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return _checked_http_url(value)

    @field_validator("dedupe_store")
    @classmethod
    def _file_or_redis(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (leave the key out to remember in memory)")
        if value is not None and "://" in value:
            parse_redis_url(value)
            if importlib.util.find_spec("redis") is None:
                raise ValueError(
                    "a redis:// store needs the redis package: install the project's "
                    "`redis` extra (pip install '.[redis]')"
                )
        return value


class WebhookSourceConfig(DeliveryConfig, ServerConfig):
    """Keys of a webhook source: a source that also serves HTTP."""

    webhook_secret: Secret = Field(
        None,
        description="POSTs must be signed with it, else 401. `whsec_<base64>`: Standard "
        "Webhooks (`webhook-id`, `webhook-timestamp` within 5 minutes, `webhook-signature: "
        "v1,<base64>`; a delivery id seen again is answered 200 without a second event); any "
        "other value: GitHub's `X-Hub-Signature-256: sha256=<hex>` (bare hex or base64 too).",
    )
    response_timeout: float = Field(
        8.0,
        gt=0,
        description="Seconds a caller waits for its answer; then 504, and its events stay queued.",
    )

    @field_validator("webhook_secret")
    @classmethod
    def _standard_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            standard_key(value.get_secret_value())  # a ValueError names what is wrong
        return value


def resolve_paths(
    config: str | os.PathLike[str] | None = None,
    secret: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Path, Path, bool]:
    """Return (config path, secret path, whether that must exist: only a --secret one)."""
    env = os.environ if environ is None else environ
    config_path = config or env.get("CONNECTOR_CONFIG") or "config.yml"
    secret_path = secret or env.get("CONNECTOR_SECRET") or "secret.yml"
    return Path(config_path), Path(secret_path), bool(secret)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` refusing a key given twice in one mapping, which PyYAML would
    resolve silently in favour of the last: ``interval: 0`` then ``interval: 5`` is a
    mistake to show, not a choice to make."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then a key of base: an override YAML allows
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:
                continue  # an unhashable key: the constructor below reports it
            if first != line:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} is given twice, at lines {first} and {line}",
                    problem_mark=key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path, what: str, required: bool) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError([f"{what} file not found: {path}"]) from None
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{what} file {path} cannot be read: {exc}"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "invalid YAML"
        raise ConfigError([f"{what} file {path} is not valid YAML{where}: {problem}"]) from None
    except RecursionError:
        # PyYAML composes recursively: thousands of nested brackets exhaust the stack.
        raise ConfigError([f"{what} file {path} is not valid YAML: nested too deeply"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError([f"{what} file {path} must hold a mapping of keys, not {kind}"])
    return data


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into a copy of ``base``; nested mappings merge, anything else replaces."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: Mapping[str, Any], from_env: Mapping[str, str]) -> str:
    loc = error["loc"]
    field = ".".join(str(part) for part in loc) or "(root)"
    kind = error["type"]
    if kind == "missing":
        names = " / ".join(f"${name}" for name in ENV_FALLBACKS.get(str(loc[0]), ()))
        hint = f" (or set {names})" if names else ""
        return f"{field}: required but missing{hint}"
    if kind == "extra_forbidden":
        return f"{field}: unknown key (check the spelling; the config model does not define it)"
    message = str(error["msg"]).removeprefix("Value error, ")
    origin = from_env.get(str(loc[0])) if loc else None
    # A value taken from the environment is not in any file: say where it came from.
    suffix = f" (value from ${origin})" if origin and len(loc) == 1 else ""
    return f"{field}: {message}{suffix}"


def _one_line(text: str) -> str:
    # A validator's message may span lines; each problem must stay one line. Secrets
    # are masked before this, so a multi-line secret (a PEM key) is still found whole.
    return " ".join(text.split())


def _leaf_values(data: Any) -> list[str]:
    if isinstance(data, SecretStr | SecretBytes):
        data = data.get_secret_value()
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    if isinstance(data, Mapping):
        data = list(data.values())
    if isinstance(data, list):
        return [leaf for value in data for leaf in _leaf_values(value)]
    if data is None or isinstance(data, bool):
        return []
    return [str(data)]


def _secret_leaves(annotation: Any, data: Any) -> list[str]:
    """Values in ``data`` that ``annotation`` types as secrets (in sub-models, lists, dicts)."""
    if annotation in (SecretStr, SecretBytes):
        return _leaf_values(data)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if not isinstance(data, Mapping):
            return []
        found: list[str] = []
        for name, info in annotation.model_fields.items():
            key = info.alias if info.alias in data else name
            if key in data:
                found.extend(_secret_leaves(info.annotation, data[key]))
        return found
    origin, args = get_origin(annotation), get_args(annotation)
    if not args:
        return []
    if isinstance(origin, type) and issubclass(origin, Mapping):
        if not isinstance(data, Mapping):
            return []
        return [leaf for item in data.values() for leaf in _secret_leaves(args[-1], item)]
    if isinstance(origin, type) and issubclass(origin, (Sequence, AbstractSet)):
        if not isinstance(data, list):
            return []
        return [leaf for item in data for arg in args for leaf in _secret_leaves(arg, item)]
    # A union (``X | None``) or ``Annotated[X, ...]``: any of its types may hold a secret.
    return [leaf for arg in args for leaf in _secret_leaves(arg, data)]


def _secret_values(
    model: type[BaseModel], config: Mapping[str, Any], secret: Mapping[str, Any]
) -> list[str]:
    """Every value that must not be echoed: all of secret.yml, and secret-typed fields."""
    values = _leaf_values(secret) + _secret_leaves(model, config)
    # Longest first, so a secret containing another one is masked whole.
    unique = {value for value in values if len(value) >= _MIN_REDACTED_LENGTH}
    return sorted(unique, key=len, reverse=True)


def _redact(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, _MASK)
    return text


def load_config(
    model: type[C],
    config: str | os.PathLike[str] | None = None,
    secret: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> C:
    """Load, merge and validate the config, or raise ConfigError; ``defaults`` fill unset keys."""
    env = os.environ if environ is None else environ
    config_path, secret_path, secret_required = resolve_paths(config, secret, env)
    config_data = _read_yaml(config_path, "config", required=True)
    secret_data = _read_yaml(secret_path, "secret", required=secret_required)
    data = deep_merge(config_data, secret_data)
    from_env: dict[str, str] = {}
    for key, names in ENV_FALLBACKS.items():
        # A key left empty (``target:``) counts as absent: a ConfigMap may leave it to $K_SINK.
        if key in model.model_fields and data.get(key) is None:
            name = next((name for name in names if env.get(name)), None)
            if name is not None:
                data[key], from_env[key] = env[name], name
    for key, value in (defaults or {}).items():
        if data.get(key) is None:
            data[key] = value
    origins = {key: f"${name}" for key, name in from_env.items()}
    for key in ENV_FALLBACKS:
        for path, layer in ((secret_path, secret_data), (config_path, config_data)):
            if key not in origins and layer.get(key) is not None:
                origins[key] = path.name
    secrets = _secret_values(model, config_data, secret_data)
    try:
        loaded = model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        lines = [_one_line(_redact(f"config: {_describe(e, from_env)}", secrets)) for e in errors]
        raise ConfigError(lines) from None
    except Exception as exc:
        # pydantic turns only ValueError and AssertionError into validation errors; a
        # validator raising anything else still means this configuration cannot be used.
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        line = f"config: {model.__name__} rejected the configuration: {detail}"
        raise ConfigError([_one_line(_redact(line, secrets))]) from None
    loaded._masked_values = secrets
    loaded._origins = origins
    loaded._warnings = _secrets_in_config(model, config_data, config_path, secret_path)
    return loaded


def _secrets_in_config(
    model: type[BaseModel], config_data: Mapping[str, Any], config_path: Path, secret_path: Path
) -> list[str]:
    """One line when config.yml holds secret-typed keys: they belong in secret.yml, which
    is kept apart (a Kubernetes Secret, not a ConfigMap; never in git)."""
    keys = [
        key
        for key, info in model.model_fields.items()
        if key in config_data and _secret_leaves(info.annotation, config_data[key])
    ]
    if not keys:
        return []
    names = ", ".join(keys)
    return [
        f"{config_path.name} holds the secret key(s) {names}: move them to {secret_path.name}"
        " (a Kubernetes Secret, kept out of git), which is merged over it"
    ]


def masked_dump(config: ConnectorConfig) -> dict[str, Any]:
    """``config`` as JSON-ready data for logs, every secret (and URLs' credentials) masked."""
    data = config.model_dump(mode="json")
    for key in _SHOWN_URL_FIELDS:
        if isinstance(data.get(key), str):
            data[key] = redact_url(data[key])
    return _mask_strings(data, config.redact)  # type: ignore[no-any-return]


def _mask_strings(data: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, dict):
        return {key: _mask_strings(value, redact) for key, value in data.items()}
    if isinstance(data, list):
        return [_mask_strings(value, redact) for value in data]
    return data
