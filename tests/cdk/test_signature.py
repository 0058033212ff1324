"""cdk.signature: HMAC-SHA256 webhook signatures (GitHub's, Standard Webhooks'), and the
webhook_secret config key."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from cdk import signature
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


# -- Standard Webhooks ---------------------------------------------------------------------

STANDARD_KEY = b"standard-webhooks-test-key-0123456789"
STANDARD_SECRET = "whsec_" + base64.b64encode(STANDARD_KEY).decode()
NOW = 1_700_000_000


def standard_headers(
    body: bytes = BODY, delivery_id: str = "msg_2Kf9", stamp: int = NOW, sig: str | None = None
) -> dict[str, str]:
    """Headers as the scheme's reference library signs them."""
    when = datetime.fromtimestamp(stamp, tz=UTC)
    signed = Webhook(STANDARD_SECRET).sign(delivery_id, when, body)
    return {
        "webhook-id": delivery_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": signed if sig is None else sig,
    }


def test_standard_webhooks_reference_signatures_pass_and_name_the_delivery() -> None:
    headers = standard_headers()
    assert signature.check(STANDARD_SECRET, headers, BODY, now=NOW) == "msg_2Kf9"
    ours = signature.sign_standard(STANDARD_KEY, "msg_2Kf9", NOW, BODY)
    assert ours == headers["webhook-signature"]
    # The reference library takes what this kit signs (its clock: a fresh timestamp).
    fresh = int(datetime.now(UTC).timestamp())
    fresh_headers = {
        "webhook-id": "m",
        "webhook-timestamp": str(fresh),
        "webhook-signature": signature.sign_standard(STANDARD_KEY, "m", fresh, BODY),
    }
    Webhook(STANDARD_SECRET).verify(BODY, fresh_headers)
    assert signature.check(STANDARD_SECRET, fresh_headers, BODY) == "m"


def test_standard_webhooks_secret_without_padding_is_the_same_key() -> None:
    unpadded = STANDARD_SECRET.rstrip("=")
    assert unpadded != STANDARD_SECRET
    assert signature.standard_key(unpadded) == STANDARD_KEY
    assert signature.check(unpadded, standard_headers(), BODY, now=NOW) == "msg_2Kf9"


def test_one_matching_signature_among_several_is_enough() -> None:
    good = standard_headers()["webhook-signature"]
    other = signature.sign_standard(b"an older key", "msg_2Kf9", NOW, BODY)
    for sig in (f"{other} {good}", f"v2,abc {good}", f"{good} {other}"):
        assert signature.check(STANDARD_SECRET, standard_headers(sig=sig), BODY, now=NOW)


@pytest.mark.parametrize("offset", [-signature.TOLERANCE, signature.TOLERANCE])
def test_a_timestamp_up_to_five_minutes_off_passes(offset: int) -> None:
    headers = standard_headers(stamp=NOW + offset)
    assert signature.check(STANDARD_SECRET, headers, BODY, now=NOW) == "msg_2Kf9"


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        (standard_headers(stamp=NOW - 301), BODY, "more than 300 s away"),
        (standard_headers(stamp=NOW + 301), BODY, "more than 300 s away"),
        (standard_headers(), BODY + b" ", "no valid v1 signature"),
        ({**standard_headers(), "webhook-id": "msg_other"}, BODY, "no valid v1 signature"),
        (standard_headers(sig="v2," + "A" * 44), BODY, "no valid v1 signature"),
        (standard_headers(sig="v1"), BODY, "no valid v1 signature"),
        ({**standard_headers(), "webhook-timestamp": "17e8"}, BODY, "not a Unix time"),
        ({**standard_headers(), "webhook-timestamp": "-5"}, BODY, "not a Unix time"),
        ({"webhook-id": "m", "webhook-timestamp": str(NOW)}, BODY, "missing webhook-id"),
        ({"x-hub-signature-256": sign(STANDARD_SECRET, BODY)}, BODY, "missing webhook-id"),
    ],
)
def test_what_standard_webhooks_refuses(headers: dict[str, str], body: bytes, reason: str) -> None:
    with pytest.raises(signature.SignatureError, match=reason):
        signature.check(STANDARD_SECRET, headers, body, now=NOW)


def test_any_other_secret_means_github_signatures() -> None:
    github = {"x-hub-signature-256": sign(SECRET, BODY)}
    assert signature.check(SECRET, github, BODY) is None  # GitHub's has no delivery id here
    with pytest.raises(signature.SignatureError, match="x-hub-signature-256"):
        signature.check(SECRET, standard_headers(), BODY)


@pytest.mark.parametrize("value", ["whsec_", "whsec_not*base64"])
def test_a_standard_secret_that_is_not_base64_is_a_config_error(tmp_path: Path, value: str) -> None:
    config = write(tmp_path / "c.yml", "target: http://127.0.0.1:9/\n")
    secret = write(tmp_path / "s.yml", f"webhook_secret: '{value}'\n")
    with pytest.raises(ConfigError) as info:
        load_config(WebhookSourceConfig, config, secret, {})
    assert "webhook_secret: a Standard Webhooks secret has" in str(info.value)
    assert "not*base64" not in str(info.value)  # a secret, even a broken one, is not shown
