"""API keys: generated here, stored only as SHA-256 digests, checked in constant time; and the webhook
signing secret's format (Standard Webhooks `whsec_<base64>`).

`TD_API_KEYS` holds `sha256:<hex>` digests, so neither the environment, `.env`, a settings dump nor a log line
carries a usable key. A key is 32 random bytes (`td_` + URL-safe base64): with that much entropy one SHA-256
is enough (a slow password hash guards low-entropy secrets, which these are not).

The caller's scope is a short digest of its key: it names the key in Redis (rate limit, quota, Idempotency-Key
records) without being the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

from fastapi import HTTPException

from service.settings import Settings

KEY_PREFIX = "td_"
DIGEST_PREFIX = "sha256:"
WEBHOOK_SECRET_PREFIX = "whsec_"
ANONYMOUS = "anonymous"  # the scope of every request when authentication is disabled
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def new_api_key() -> str:
    """A fresh key: `td_` + 32 random bytes in URL-safe base64 (43 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    """`sha256:<hex>` of a key: the form TD_API_KEYS stores."""
    return DIGEST_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def is_key_digest(entry: str) -> bool:
    return bool(_DIGEST.match(entry))


def scope_of(digest: str) -> str:
    """The caller's scope: 16 hex digits of its key's digest (enough to keep keys apart, not to find one)."""
    return digest.removeprefix(DIGEST_PREFIX)[:16]


def authenticate(settings: Settings, offered: str | None) -> str:
    """The scope of the key `offered`; ANONYMOUS when authentication is disabled.

    Raises:
        HTTPException: 401 when keys are configured and `offered` is none of them.
    """
    if not settings.api_keys:
        return ANONYMOUS
    if offered is not None:
        digest = key_digest(offered)
        # Every entry is compared (no early exit) in constant time. Entries are digests after Settings
        # validation; a plain one (a settings copy made without validation) is hashed here.
        matched = None
        for entry in settings.api_keys:
            expected = entry if is_key_digest(entry) else key_digest(entry)
            if hmac.compare_digest(digest, expected):
                matched = expected
        if matched is not None:
            return scope_of(matched)
    raise HTTPException(
        status_code=401,
        detail="a valid API key is required (Authorization: Bearer <key>)",
        headers={"WWW-Authenticate": "Bearer"},
    )


def check_auth_configured(settings: Settings) -> None:
    """Refuse to serve without keys unless authentication was explicitly disabled (local runs).

    Raises:
        RuntimeError: no TD_API_KEYS and TD_AUTH_DISABLED is not set.
    """
    if not settings.api_keys and not settings.auth_disabled:
        raise RuntimeError(
            "TD_API_KEYS is empty: set API key digests (`tdserve keygen`), or TD_AUTH_DISABLED=true for a "
            "local run without keys (`tdserve run` does this)"
        )


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret.

    Raises:
        ValueError: not `whsec_` + base64 of 24 to 64 bytes (the Standard Webhooks range).
    """
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError("webhook_secret must start with whsec_ (`tdserve keygen --webhook` makes one)")
    try:
        raw = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("webhook_secret must be whsec_ followed by base64") from None
    if not 24 <= len(raw) <= 64:
        raise ValueError(f"webhook_secret must hold 24 to 64 bytes, not {len(raw)}")
    return raw
