"""The configuration loader: where files come from, how they merge, and how problems read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field, SecretStr, field_validator

from cdk.config import (
    ConfigError,
    SinkConfig,
    SourceConfig,
    WebhookSourceConfig,
    load_config,
    masked_dump,
    redact_url,
    resolve_paths,
)

TOKEN = "tok-3f9a1c77e2b04d51"  # must never be echoed
PASSWORD = "pw-8d2e6b10c4aa"


class MySource(SourceConfig):
    """A connector's own model: nested section and a secret of its own."""

    api_key: SecretStr = Field(..., min_length=8)
    region: str = "eu"
    options: dict[str, int] = Field(default_factory=dict)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def problems(model: type[Any], config: Path, secret: Path | None = None, **env: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(model, config, secret, environ=env)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- where the files come from -------------------------------------------------------


def test_paths_flag_beats_env_beats_default() -> None:
    env = {"CONNECTOR_CONFIG": "/env/c.yml", "CONNECTOR_SECRET": "/env/s.yml"}
    assert resolve_paths("a.yml", "b.yml", env) == (Path("a.yml"), Path("b.yml"), True)
    assert resolve_paths(None, None, env) == (Path("/env/c.yml"), Path("/env/s.yml"), False)
    assert resolve_paths(None, None, {}) == (Path("config.yml"), Path("secret.yml"), False)


def test_default_files_in_working_directory(cwd: Path) -> None:
    write(cwd / "config.yml", "target: http://127.0.0.1:1/\n")
    write(cwd / "secret.yml", "send_event_attempts: 7\n")
    config = load_config(SourceConfig, environ={})
    assert config.target == "http://127.0.0.1:1/"
    assert config.send_event_attempts == 7


def test_env_var_paths_used_without_flags(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "target: http://c/\n")
    secret = write(tmp_path / "s.yml", "batch_size: 5\n")
    env = {"CONNECTOR_CONFIG": str(config), "CONNECTOR_SECRET": str(secret)}
    loaded = load_config(SourceConfig, environ=env)
    assert (loaded.target, loaded.batch_size) == ("http://c/", 5)


def test_flag_paths_beat_env_var_paths(tmp_path: Path) -> None:
    write(tmp_path / "env.yml", "target: http://from-env/\n")
    flag = write(tmp_path / "flag.yml", "target: http://from-flag/\n")
    env = {"CONNECTOR_CONFIG": str(tmp_path / "env.yml")}
    assert load_config(SourceConfig, flag, environ=env).target == "http://from-flag/"


def test_missing_default_secret_is_fine(cwd: Path) -> None:
    write(cwd / "config.yml", "port: 9000\n")
    assert load_config(SinkConfig, environ={}).port == 9000


def test_missing_explicit_secret_is_an_error(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "port: 9000\n")
    missing = tmp_path / "nope.yml"
    assert problems(SinkConfig, config, missing) == [f"secret file not found: {missing}"]
    env = {"CONNECTOR_SECRET": str(tmp_path / "s.yml")}
    lines = problems(SinkConfig, config, missing, **env)
    assert lines == [f"secret file not found: {missing}"]


def test_secret_from_env_is_used_when_it_exists(tmp_path: Path) -> None:
    """An image sets $CONNECTOR_SECRET; the Secret volume behind it may be absent."""
    config = write(tmp_path / "c.yml", "port: 9000\n")
    env = {"CONNECTOR_SECRET": str(tmp_path / "s.yml")}
    assert load_config(SinkConfig, config, environ=env).auth_token is None
    write(tmp_path / "s.yml", "auth_token: from-the-secret\n")
    token = load_config(SinkConfig, config, environ=env).auth_token
    assert token is not None and token.get_secret_value() == "from-the-secret"


def test_empty_config_file_means_defaults(tmp_path: Path) -> None:
    config = load_config(SinkConfig, write(tmp_path / "c.yml", ""), environ={})
    assert (config.port, config.log_level, config.auth_token) == (8080, "INFO", None)


# -- merging and environment fallbacks -------------------------------------------------


def test_secret_deep_merges_over_config(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.yml",
        "target: http://t/\napi_key: placeholder\nregion: us\noptions: {a: 1, b: 2}\n",
    )
    secret = write(tmp_path / "s.yml", f"api_key: {PASSWORD}\noptions: {{b: 20, c: 30}}\n")
    loaded = load_config(MySource, config, secret, environ={})
    assert loaded.api_key.get_secret_value() == PASSWORD
    assert loaded.region == "us"
    assert loaded.options == {"a": 1, "b": 20, "c": 30}


def test_target_from_connector_target_then_k_sink(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "batch_size: 2\n")
    both = {"CONNECTOR_TARGET": "http://ct/", "K_SINK": "http://ks/"}
    assert load_config(SourceConfig, config, environ=both).target == "http://ct/"
    assert load_config(SourceConfig, config, environ={"K_SINK": "http://ks/"}).target == (
        "http://ks/"
    )


def test_file_value_beats_env_fallback(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "target: http://file/\nport: 9001\nlog_level: error\n")
    env = {"CONNECTOR_TARGET": "http://env/", "CONNECTOR_PORT": "9002", "LOG_LEVEL": "DEBUG"}
    loaded = load_config(WebhookSourceConfig, config, environ=env)
    assert (loaded.target, loaded.port, loaded.log_level) == ("http://file/", 9001, "ERROR")


def test_port_and_log_level_from_env(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "{}\n")
    loaded = load_config(
        SinkConfig, config, environ={"CONNECTOR_PORT": "9100", "LOG_LEVEL": "debug"}
    )
    assert (loaded.port, loaded.log_level) == (9100, "DEBUG")


def test_env_fallback_ignored_when_model_lacks_the_key(tmp_path: Path) -> None:
    # A sink has no `target`: $K_SINK must not turn into an "unknown key" error.
    config = write(tmp_path / "c.yml", "{}\n")
    assert load_config(SinkConfig, config, environ={"K_SINK": "http://x/"}).port == 8080


def test_bad_env_value_says_where_it_came_from(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "{}\n")
    [line] = problems(SinkConfig, config, CONNECTOR_PORT="eighty")
    assert line.startswith("config: port: ")
    assert "$CONNECTOR_PORT" in line


# -- every problem is one readable line naming the field ---------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yml"
    assert problems(SinkConfig, missing) == [f"config file not found: {missing}"]


def test_unreadable_config_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file, whatever the user's privileges.
    [line] = problems(SinkConfig, tmp_path)
    assert line.startswith(f"config file {tmp_path} cannot be read")
    binary = tmp_path / "bin.yml"
    binary.write_bytes(b"port: \xff\xfe\n")
    [line] = problems(SinkConfig, binary)
    assert line.startswith(f"config file {binary} cannot be read")


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "port: 8080\nlog_level: INFO\n  bad: [\n")
    [line] = problems(SinkConfig, config)
    assert line.startswith(f"config file {config} is not valid YAML at line 3")


def test_invalid_yaml_in_secret_names_the_file(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "port: 8080\n")
    secret = write(tmp_path / "s.yml", f"auth_token: {TOKEN}\n: : :\n")
    [line] = problems(SinkConfig, config, secret)
    assert line.startswith(f"secret file {secret} is not valid YAML at line 2")
    assert TOKEN not in line


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text\n", "str")])
def test_root_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    config = write(tmp_path / "c.yml", text)
    assert problems(SinkConfig, config) == [
        f"config file {config} must hold a mapping of keys, not {kind}"
    ]


def test_missing_field_names_field_and_env_vars(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "batch_size: 2\n")
    assert problems(SourceConfig, config) == [
        "config: target: required but missing (or set $CONNECTOR_TARGET / $K_SINK)"
    ]


def test_mistyped_field(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "target: http://t/\nbatch_size: many\n")
    [line] = problems(SourceConfig, config)
    assert line.startswith("config: batch_size: ")
    assert "integer" in line


def test_unknown_key(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "target: http://t/\nbatch_sise: 2\n")
    [line] = problems(SourceConfig, config)
    assert line.startswith("config: batch_sise: unknown key")


@pytest.mark.parametrize(
    "url", ["ftp://host/x", "not a url", "http://", "http://host:99999/", "http://host:port/"]
)
def test_bad_url(tmp_path: Path, url: str) -> None:
    config = write(tmp_path / "c.yml", f"target: '{url}'\n")
    [line] = problems(SourceConfig, config)
    assert line.startswith("config: target: ")
    assert "URL" in line


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("port", 70000),
        ("port", -1),
        ("batch_size", 0),
        ("max_body_bytes", 10),
        ("grace_period", -1),
    ],
)
def test_out_of_range_number(tmp_path: Path, key: str, value: int) -> None:
    target = "target: http://t/\n"
    config = write(tmp_path / "c.yml", f"{target}{key}: {value}\n")
    [line] = problems(WebhookSourceConfig, config)
    assert line.startswith(f"config: {key}: ")
    assert any(word in line for word in ("greater", "less"))


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "port: x\nbogus: 1\nlog_level: LOUD\n")
    lines = problems(SinkConfig, config)
    assert sorted(line.split(":")[1].strip() for line in lines) == ["bogus", "log_level", "port"]
    assert all("\n" not in line for line in lines)


def test_nested_field_path_is_dotted(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "target: http://t/\napi_key: abcdefgh\noptions: {a: x}\n")
    [line] = problems(MySource, config)
    assert line.startswith("config: options.a: ")


# -- secrets never show ---------------------------------------------------------------


def test_secret_fields_are_masked_in_repr_and_dump(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "target: http://t/\nport: 9000\n")
    secret = write(tmp_path / "s.yml", f"auth_token: {TOKEN}\napi_key: {PASSWORD}\n")

    class Hook(WebhookSourceConfig):
        api_key: SecretStr

    loaded = load_config(Hook, config, secret, environ={})
    assert loaded.auth_token is not None
    assert loaded.auth_token.get_secret_value() == TOKEN
    for text in (repr(loaded), str(loaded), loaded.model_dump_json(), str(loaded.model_dump())):
        assert TOKEN not in text
        assert PASSWORD not in text


def test_secret_values_never_in_errors(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", f"target: http://t/\napi_key: {PASSWORD}\nbatch_size: 0\n")
    secret = write(tmp_path / "s.yml", f"auth_token: {TOKEN}\nextra_secret: {TOKEN}x\n")

    class Hook(WebhookSourceConfig):
        api_key: SecretStr

    with pytest.raises(ConfigError) as info:
        load_config(Hook, config, secret, environ={})
    everything = " ".join([*info.value.problems, str(info.value), repr(info.value)])
    assert "extra_secret" in everything and "batch_size" in everything
    assert TOKEN not in everything
    assert PASSWORD not in everything


def test_mistyped_secret_is_not_echoed(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "{}\n")
    secret = write(tmp_path / "s.yml", "auth_token: [1234567890, 9876543210]\n")
    [line] = problems(SinkConfig, config, secret)
    assert line.startswith("config: auth_token: ")
    assert "1234567890" not in line


def test_secret_echoed_by_a_validator_is_masked(tmp_path: Path) -> None:
    # A user's validator that quotes its input must not leak a secret through the loader.
    class Checked(MySource):
        @field_validator("api_key")
        @classmethod
        def _leak(cls, value: SecretStr) -> SecretStr:
            raise ValueError(f"rejected {value.get_secret_value()}")

    config = write(tmp_path / "c.yml", "target: http://t/\n")
    secret = write(tmp_path / "s.yml", f"api_key: {PASSWORD}\n")
    [line] = problems(Checked, config, secret)
    assert line.startswith("config: api_key: rejected ")
    assert PASSWORD not in line


def test_url_password_masked_in_errors(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", f"target: 'ftp://user:{PASSWORD}@host/'\n")
    [line] = problems(SourceConfig, config)
    assert PASSWORD not in line
    assert "user:" in line


def test_redact_url() -> None:
    assert redact_url("http://h:1/p?q") == "http://h:1/p?q"
    assert redact_url(f"https://u:{PASSWORD}@h:8443/p") == "https://u:**********@h:8443/p"
    assert PASSWORD not in redact_url(f"http://u:{PASSWORD}@[::1]:99/")
    # The webhook spec's query-parameter token is a secret too.
    assert (
        redact_url(f"http://h/p?a=1&access_token={TOKEN}&b")
        == "http://h/p?a=1&access_token=**********&b"
    )


def test_target_auth_token_is_a_secret_and_never_blank(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "target: http://t/\n")
    secret = write(tmp_path / "s.yml", f"target_auth_token: {TOKEN}\n")
    loaded = load_config(SourceConfig, config, secret, environ={})
    assert loaded.target_auth_token is not None
    assert loaded.target_auth_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(loaded)
    write(tmp_path / "s.yml", "target_auth_token: ''\n")
    assert problems(SourceConfig, config, secret) == [
        "config: target_auth_token: must not be empty (leave the key out to turn auth off)"
    ]


# -- a model's own validators, and files no parser can take -----------------------------


@pytest.mark.parametrize("error", [TypeError, KeyError, RuntimeError])
def test_validator_raising_any_exception_is_a_config_problem(
    tmp_path: Path, error: type[Exception]
) -> None:
    # pydantic wraps only ValueError/AssertionError; anything else must not escape as a
    # traceback, nor quote a secret.
    class Strict(SinkConfig):
        api_key: SecretStr | None = None

        @field_validator("api_key")
        @classmethod
        def _check(cls, value: SecretStr | None) -> SecretStr | None:
            raise error(f"cannot check {value.get_secret_value() if value else ''}")

    config = write(tmp_path / "c.yml", f"api_key: {PASSWORD}\n")
    [line] = problems(Strict, config)
    assert line.startswith(f"config: Strict rejected the configuration: {error.__name__}: ")
    assert PASSWORD not in line


def test_deeply_nested_yaml_is_a_config_problem(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "port: " + "[" * 20000 + "]" * 20000 + "\n")
    assert problems(SinkConfig, config) == [
        f"config file {config} is not valid YAML: nested too deeply"
    ]


def test_tab_indentation_names_line_and_column(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "port: 8080\n\tlog_level: INFO\n")
    [line] = problems(SinkConfig, config)
    assert line.startswith(f"config file {config} is not valid YAML at line 2, column 1: ")
    assert "'\\t'" in line


def test_control_character_names_the_problem(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "port: 8080\x00\n")
    [line] = problems(SinkConfig, config)
    assert line == f"config file {config} is not valid YAML: special characters are not allowed"


def test_port_as_quoted_string_in_yaml_is_like_the_env_value(tmp_path: Path) -> None:
    from_file = load_config(SinkConfig, write(tmp_path / "c.yml", "port: '8081'\n"), environ={})
    from_env = load_config(
        SinkConfig, write(tmp_path / "e.yml", "{}\n"), environ={"CONNECTOR_PORT": "8081"}
    )
    assert from_file.port == from_env.port == 8081


def test_send_event_attempts_below_zero_means_until_delivered(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "target: http://t/\nsend_event_attempts: -1\n")
    assert load_config(SourceConfig, config, environ={}).send_event_attempts == -1


class Database(BaseModel):
    host: str = "db"
    password: SecretStr

    @field_validator("password")
    @classmethod
    def _echo(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 20:
            raise ValueError(f"{value.get_secret_value()} is too short")
        return value


class WithDatabases(SinkConfig):
    db: Database | None = None
    replicas: list[Database] = Field(default_factory=list)
    by_name: dict[str, Database] = Field(default_factory=dict)


def test_secrets_of_nested_models_never_in_errors(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.yml",
        f"db: {{password: {PASSWORD}}}\n"
        f"replicas: [{{password: {PASSWORD}1}}]\n"
        f"by_name: {{east: {{password: {PASSWORD}2}}}}\n",
    )
    lines = problems(WithDatabases, config)
    assert [line.split(":")[1].strip() for line in lines] == [
        "db.password",
        "replicas.0.password",
        "by_name.east.password",
    ]
    assert PASSWORD not in " ".join(lines)


def test_masked_dump_hides_every_secret(tmp_path: Path) -> None:
    # secret.yml values are masked even in fields not typed as secrets.
    class Plain(WithDatabases):
        username: str = ""

    config = write(tmp_path / "c.yml", f"db: {{password: {PASSWORD}-long-enough}}\n")
    secret = write(tmp_path / "s.yml", f"username: {TOKEN}\nauth_token: {TOKEN}x\n")
    loaded = load_config(Plain, config, secret, environ={})
    assert loaded.username == TOKEN
    dumped = masked_dump(loaded)
    assert (dumped["username"], dumped["auth_token"]) == ("**********", "**********")
    assert dumped["db"] == {"host": "db", "password": "**********"}
    assert TOKEN not in str(dumped) and PASSWORD not in str(dumped)


def test_masked_dump_hides_credentials_in_every_target_url(tmp_path: Path) -> None:
    # Not only target's: dead_letter_target may carry a password or an access_token too.
    url = f"http://u:{PASSWORD}@h.example/?access_token={TOKEN}"
    config = write(tmp_path / "c.yml", f"target: {url}\ndead_letter_target: {url}\n")
    dumped = masked_dump(load_config(SourceConfig, config, environ={}))
    masked = "http://u:**********@h.example/?access_token=**********"
    assert (dumped["target"], dumped["dead_letter_target"]) == (masked, masked)


def test_multi_line_validator_message_stays_one_line(tmp_path: Path) -> None:
    pem = "-----BEGIN KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASC\n-----END KEY-----"

    class Keyed(SinkConfig):
        key: SecretStr

        @field_validator("key")
        @classmethod
        def _check(cls, value: SecretStr) -> SecretStr:
            raise ValueError(f"not a key we know:\n{value.get_secret_value()}\nsee the docs")

    config = write(tmp_path / "c.yml", "port: 9000\n")
    secret = write(tmp_path / "s.yml", "key: |\n  " + pem.replace("\n", "\n  ") + "\n")
    [line] = problems(Keyed, config, secret)
    assert line == "config: key: not a key we know: ********** see the docs"


@pytest.mark.parametrize("token", ["''", "'   '"])
def test_blank_auth_token_is_refused_rather_than_turning_auth_off(
    tmp_path: Path, token: str
) -> None:
    config = write(tmp_path / "c.yml", "port: 8080\n")
    secret = write(tmp_path / "s.yml", f"auth_token: {token}\n")
    assert problems(SinkConfig, config, secret) == [
        "config: auth_token: must not be empty (leave the key out to turn auth off)"
    ]


def test_redact_masks_secret_fields_of_a_model_built_in_code() -> None:
    class Nested(BaseModel):
        password: SecretStr

    class WithNested(SourceConfig):
        db: Nested

    config = WithNested(
        target="http://x", target_auth_token="tok-123456", db={"password": "pw-98765"}
    )
    text = config.redact("Bearer tok-123456 and pw-98765 and tok")
    assert text == "Bearer ********** and ********** and tok"


def test_redact_masks_every_value_of_secret_yml(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text("target: http://x\n")
    (tmp_path / "secret.yml").write_text("target_auth_token: tok-123456\n")
    config = load_config(SourceConfig, tmp_path / "config.yml", tmp_path / "secret.yml")
    assert config.redact("echo: tok-123456") == "echo: **********"


# -- strictness: keys given twice, secrets in config.yml, where values came from ------


@pytest.mark.parametrize("what", ["config", "secret"])
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path: Path, what: str) -> None:
    config = write(tmp_path / "config.yml", f"target: http://t/\napi_key: {TOKEN}\n")
    twice = "region: eu\ninterval: 0\noptions: {}\ninterval: 5\n"
    secret = write(tmp_path / "secret.yml", twice if what == "secret" else "")
    if what == "config":
        write(config, f"target: http://t/\napi_key: {TOKEN}\n{twice}")
    lines = problems(MySource, config, secret)
    assert len(lines) == 1
    first, second = (4, 6) if what == "config" else (2, 4)
    assert f"key 'interval' is given twice, at lines {first} and {second}" in lines[0]
    assert lines[0].startswith(f"{what} file ")


def test_a_key_given_twice_in_a_nested_mapping_is_refused(tmp_path: Path) -> None:
    text = f"target: http://t/\napi_key: {TOKEN}\noptions:\n  a: 1\n  b: 2\n  a: 3\n"
    lines = problems(MySource, write(tmp_path / "config.yml", text))
    assert "key 'a' is given twice, at lines 4 and 6" in lines[0]


def test_a_merge_key_override_is_no_duplicate(tmp_path: Path) -> None:
    text = (
        f"target: http://t/\napi_key: {TOKEN}\nbase: &base {{a: 1, b: 2}}\n"
        "options:\n  <<: *base\n  a: 3\n"
    )
    with pytest.raises(ConfigError) as info:  # `base` is no key of the model
        load_config(MySource, write(tmp_path / "config.yml", text), environ={})
    assert info.value.problems == [
        "config: base: unknown key (check the spelling; the config model does not define it)"
    ]


def test_a_secret_in_config_yml_is_one_warning_naming_secret_yml(tmp_path: Path) -> None:
    config = write(tmp_path / "config.yml", f"target: http://t/\napi_key: {TOKEN}\n")
    loaded = load_config(MySource, config, environ={})
    assert len(loaded.load_warnings) == 1
    assert "api_key" in loaded.load_warnings[0] and "secret.yml" in loaded.load_warnings[0]
    assert TOKEN not in loaded.load_warnings[0]
    write(config, "target: http://t/\n")
    write(tmp_path / "secret.yml", f"api_key: {TOKEN}\n")
    assert load_config(MySource, config, tmp_path / "secret.yml", environ={}).load_warnings == []


def test_origin_names_the_file_the_variable_or_the_default(tmp_path: Path) -> None:
    config = write(tmp_path / "config.yml", "port: 9000\n")
    loaded = load_config(WebhookSourceConfig, config, environ={"K_SINK": "http://k/"})
    assert (loaded.origin("port"), loaded.origin("target")) == ("config.yml", "$K_SINK")
    write(tmp_path / "secret.yml", "target: http://s/\n")
    loaded = load_config(WebhookSourceConfig, write(config, ""), tmp_path / "secret.yml", {})
    assert (loaded.origin("port"), loaded.origin("target")) == ("default", "secret.yml")
