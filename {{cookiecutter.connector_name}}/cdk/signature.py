"""Webhook signatures: the HMAC-SHA256 of a request, checked in constant time.

Two schemes, told apart by the secret. A ``whsec_<base64>`` secret is Standard Webhooks'
(standardwebhooks.com): ``webhook-signature: v1,<base64>`` (several, space-separated)
over ``{webhook-id}.{webhook-timestamp}.{body}``, the timestamp at most ``TOLERANCE``
seconds off. Any other secret is GitHub's: ``X-Hub-Signature-256: sha256=<hex>`` over the
body; other senders put that digest in a header alone, as hex or as base64, and
``verify`` takes any of these forms. :func:`check` applies the scheme a secret names.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

__all__ = [
    "HEADER",
    "STANDARD_PREFIX",
    "TOLERANCE",
    "SignatureError",
    "check",
    "sign",
    "sign_standard",
    "standard_key",
    "verify",
]

HEADER = "x-hub-signature-256"  # GitHub's header, lower-case as the HTTP layer gives it
#: What starts a Standard Webhooks secret; the rest is its key in base64.
STANDARD_PREFIX = "whsec_"
#: Seconds a Standard Webhooks timestamp may be off, either way (the scheme's 5 minutes).
TOLERANCE = 300
_STANDARD_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
_PREFIX = "sha256="
_URL_SAFE = str.maketrans("-_", "+/")


def _digest(secret: str | bytes, body: bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, body, hashlib.sha256).digest()


def sign(secret: str | bytes, body: bytes) -> str:
    """The signature of ``body`` as GitHub writes it: ``sha256=<hex>``."""
    return _PREFIX + _digest(secret, body).hex()


def verify(secret: str | bytes, body: bytes, signature: str | None) -> bool:
    """Whether ``signature`` is the HMAC-SHA256 of ``body`` under ``secret``.

    Accepted: ``sha256=<hex>`` (the prefix in any case, or none), hex in either case, and
    base64 in the standard or URL-safe alphabet, padded or not. Anything else is False.
    """
    value = (signature or "").strip()
    if value[: len(_PREFIX)].lower() == _PREFIX:
        value = value[len(_PREFIX) :]
    try:
        if len(value) == 64:
            given = bytes.fromhex(value)
        elif len(value) in (43, 44):  # 32 bytes in base64, without or with its padding
            standard = value.translate(_URL_SAFE).ljust(44, "=")
            given = base64.b64decode(standard, validate=True)
        else:
            return False
    except (ValueError, binascii.Error):
        return False
    # The comparison is the only step whose time depends on the secret.
    return hmac.compare_digest(_digest(secret, body), given)


class SignatureError(Exception):
    """A request is not signed as the secret requires; ``str()`` says what is wrong (for a 401)."""


def standard_key(secret: str) -> bytes | None:
    """The HMAC key of a Standard Webhooks secret (``whsec_<base64>``), None for any other
    secret; ``ValueError`` when what follows the prefix is not base64."""
    if not secret.startswith(STANDARD_PREFIX):
        return None
    encoded = secret[len(STANDARD_PREFIX) :]
    try:  # padding is optional, as the scheme's own libraries read it
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("a Standard Webhooks secret has base64 after its prefix") from None
    if not key:
        raise ValueError("a Standard Webhooks secret has a key after its prefix")
    return key


def sign_standard(key: bytes, delivery_id: str, timestamp: int | str, body: bytes) -> str:
    """One ``webhook-signature`` entry as Standard Webhooks writes it: ``v1,<base64>``."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def check(
    secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None
) -> str | None:
    """Raise :class:`SignatureError` unless the request is signed under ``secret``, by the
    scheme the secret names. Returns the ``webhook-id`` of a Standard Webhooks request
    (its deliveries can be recognised when sent again), None for GitHub's scheme."""
    key = standard_key(secret)
    if key is None:
        if not verify(secret, body, headers.get(HEADER)):
            raise SignatureError(f"missing or wrong {HEADER} signature")
        return None
    delivery_id, stamp, signatures = (headers.get(name, "").strip() for name in _STANDARD_HEADERS)
    if not (delivery_id and stamp and signatures):
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature header")
    if not stamp.isascii() or not stamp.isdigit():
        raise SignatureError("webhook-timestamp is not a Unix time in seconds")
    if abs((time.time() if now is None else now) - int(stamp)) > TOLERANCE:
        raise SignatureError(f"webhook-timestamp is more than {TOLERANCE} s away from now")
    expected = sign_standard(key, delivery_id, stamp, body).encode()
    # Several signatures (a key being rotated): any v1 one that matches will do.
    for given in signatures.split(" "):
        if given.startswith("v1,") and hmac.compare_digest(given.encode(), expected):
            return delivery_id
    raise SignatureError("no valid v1 signature in webhook-signature")
