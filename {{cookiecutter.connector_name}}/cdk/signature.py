"""Webhook signatures: the HMAC-SHA256 of a request body, checked in constant time.

GitHub sends ``X-Hub-Signature-256: sha256=<hex>``; other senders put the digest in a
header alone, as hex or as base64. ``verify`` takes any of these forms.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

__all__ = ["HEADER", "verify"]

HEADER = "x-hub-signature-256"  # GitHub's header, lower-case as the HTTP layer gives it
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
