"""API keys: `iotm_<key id>_<secret>`, 256 random bits, kept only as a SHA-256 hash.

The prefix makes a leaked key recognisable (secret scanners, logs); the key id names the key
in lists, the audit log and revocation without revealing it; the secret is never stored.
A plain SHA-256 is the right hash here: the secret is random and 256 bits long, so there is
nothing to guess that a slow hash would protect (slow hashes are for passwords people choose).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import Literal

PREFIX = "iotm_"
_KEY = re.compile(r"^iotm_([0-9a-f]{12})_([A-Za-z0-9_\-]{43})$")


class Role(IntEnum):
    """Each role can do what the roles below it can."""

    viewer = 1
    operator = 2
    admin = 3


ROLE_NAMES = tuple(role.name for role in Role)


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    key: str
    """The whole key: shown once, never stored."""
    secret_hash: str


def new_key() -> NewKey:
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return NewKey(key_id, key, hash_key(key))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(text: str) -> str | None:
    """The key id of something shaped like a key, else None."""
    match = _KEY.fullmatch(text)
    return match.group(1) if match else None


def matches(key: str, secret_hash: str) -> bool:
    """Constant-time comparison of a presented key with a stored hash."""
    return hmac.compare_digest(hash_key(key), secret_hash)


KeyStatus = Literal["active", "expired", "revoked"]


def key_status(
    expires_at: datetime | None, revoked_at: datetime | None, now: datetime
) -> KeyStatus:
    if revoked_at is not None:
        return "revoked"
    if expires_at is not None and expires_at <= now:
        return "expired"
    return "active"


def usable(expires_at: datetime | None, revoked_at: datetime | None, now: datetime) -> bool:
    return key_status(expires_at, revoked_at, now) == "active"
