"""cdk.signature: HMAC-SHA256 webhook signatures, and the webhook_secret config key."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from cdk.config import ConfigError, WebhookSourceConfig, load_config
from cdk.signature import HEADER, sign, verify

# GitHub's documented example ("Validating webhook deliveries").
GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

SECRET = "whsec-5c1d9e0b7a"
BODY = b'{"action": "opened", "number": 42}'
DIGEST = hmac.new(SECRET.encode(), BODY, hashlib.sha256).digest()


def test_github_example() -> None:
    assert HEADER == "x-hub-signature-256"
    assert sign(GITHUB_SECRET, GITHUB_BODY) == GITHUB_SIGNATURE
    assert verify(GITHUB_SECRET, GITHUB_BODY, GITHUB_SIGNATURE)
    assert verify(GITHUB_SECRET.encode(), GITHUB_BODY, GITHUB_SIGNATURE)


@pytest.mark.parametrize(
    "signature",
    [
        "sha256=" + DIGEST.hex(),
        "SHA256=" + DIGEST.hex().upper(),
        DIGEST.hex(),
        DIGEST.hex().upper(),
        base64.b64encode(DIGEST).decode(),
        base64.b64encode(DIGEST).decode().rstrip("="),
        base64.urlsafe_b64encode(DIGEST).decode(),
        "sha256=" + base64.b64encode(DIGEST).decode(),
        f"  sha256={DIGEST.hex()}  ",
    ],
)
def test_the_accepted_forms(signature: str) -> None:
    assert verify(SECRET, BODY, signature)


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "sha256=",
        "sha1=" + hashlib.sha1(BODY).hexdigest(),
        "sha256=" + DIGEST.hex()[:-2],  # truncated
        "sha256=" + DIGEST.hex() + "00",
        "sha256=" + "zz" * 32,  # not hex
        base64.b64encode(DIGEST[:31]).decode(),  # too short
        base64.b64encode(DIGEST).decode()[:-2] + "!=",  # not base64
        "sha256=" + hmac.new(b"other", BODY, hashlib.sha256).hexdigest(),  # other secret
        "sha256=" + hmac.new(SECRET.encode(), BODY + b" ", hashlib.sha256).hexdigest(),
    ],
)
def test_everything_else_is_refused(signature: str | None) -> None:
    assert not verify(SECRET, BODY, signature)


def test_a_changed_body_fails_the_signature_of_the_original() -> None:
    signature = sign(SECRET, BODY)
    assert verify(SECRET, BODY, signature)
    assert not verify(SECRET, BODY.replace(b"42", b"43"), signature)
    assert not verify(SECRET, b"", signature)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_webhook_secret_is_an_optional_secret_key(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "target: http://127.0.0.1:9/\n")
    empty = write(tmp_path / "empty.yml", "")
    assert load_config(WebhookSourceConfig, config, empty, {}).webhook_secret is None
    secret = write(tmp_path / "s.yml", f"webhook_secret: {SECRET}\n")
    loaded = load_config(WebhookSourceConfig, config, secret, {})
    assert loaded.webhook_secret is not None
    assert verify(loaded.webhook_secret.get_secret_value(), BODY, sign(SECRET, BODY))
    for text in (repr(loaded), loaded.model_dump_json(), loaded.redact(f"echo {SECRET}")):
        assert SECRET not in text
    schema = WebhookSourceConfig.model_json_schema()["properties"]["webhook_secret"]
    assert "X-Hub-Signature-256" in schema["description"]


def test_a_blank_webhook_secret_is_refused(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", "target: http://127.0.0.1:9/\n")
    secret = write(tmp_path / "s.yml", 'webhook_secret: "  "\n')
    with pytest.raises(ConfigError) as info:
        load_config(WebhookSourceConfig, config, secret, {})
    assert "webhook_secret" in str(info.value)
