"""Device MQTT passwords: derived from a per-credential nonce and the credential secret.

The registry keeps, per device, a random nonce and the SHA-256 hash of the password. The
password itself is `HMAC-SHA256(secret, device id, nonce)`: shown once when the credential is
made, never stored. Deriving it (rather than drawing it at random) is what lets iotmeter rebuild
a broker that lost its accounts: Mosquitto 2.0's dynamic-security plugin accepts only plain
passwords (`createClient`, `setClientPassword`), so a registry holding nothing but hashes could
not give them back to it. A copy of the database alone still reveals no password: the secret
lives in the settings (`IOTMETER_DEVICE_CREDENTIAL_SECRET`) or in the data folder, not in the
registry. A plain SHA-256 suffices for the hash: the password carries 256 random bits.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

SERVICE_USERNAME = "iotmeter"
"""The broker account of iotmeter's own clients (collector, config publisher, simulator admin)."""

_DOMAIN = b"iotmeter device password v1\x00"
_SERVICE_NONCE = "service"


@dataclass(frozen=True, slots=True)
class NewCredential:
    device_id: str
    nonce: str
    password: str
    """Shown once, never stored."""
    password_hash: str


def derive_password(secret: bytes, device_id: str, nonce: str) -> str:
    """The password of `device_id`'s credential with this nonce (43 URL-safe characters)."""
    digest = hmac.new(
        secret, _DOMAIN + device_id.encode() + b"\x00" + nonce.encode(), hashlib.sha256
    ).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def hash_password(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def password_matches(password: str, password_hash: str) -> bool:
    """Constant-time check of a presented password against the stored hash."""
    return hmac.compare_digest(hash_password(password), password_hash)


def new_credential(secret: bytes, device_id: str) -> NewCredential:
    """A fresh credential (a new nonce: rotating makes every older password useless)."""
    nonce = secrets.token_urlsafe(16)
    password = derive_password(secret, device_id, nonce)
    return NewCredential(device_id, nonce, password, hash_password(password))


def service_password(secret: bytes) -> str:
    """The password of iotmeter's own broker account (embedded broker, reconciled brokers)."""
    return derive_password(secret, SERVICE_USERNAME, _SERVICE_NONCE)


def credential_secret(configured: str | None, path: Path) -> bytes:
    """The configured secret (`IOTMETER_DEVICE_CREDENTIAL_SECRET`), else the data folder's."""
    return configured.encode() if configured else load_or_create_secret(path)


def load_or_create_secret(path: Path) -> bytes:
    """The credential secret kept in the data folder (mode 0600), made on first use."""
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32).encode()
    # O_EXCL: two processes starting together agree on whichever file was made first.
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(descriptor, "wb") as file:
        file.write(secret + b"\n")
    return secret
