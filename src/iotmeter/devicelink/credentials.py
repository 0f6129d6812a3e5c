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
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from iotmeter.errors import SettingsInvalid

logger = logging.getLogger(__name__)

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


MIN_SECRET_BYTES = 32
"""A shorter secret could be guessed, and with it every device password and the service one."""


def credential_secret(configured: str | None, path: Path) -> bytes:
    """The configured secret (`IOTMETER_DEVICE_CREDENTIAL_SECRET`), else the data folder's."""
    if configured:
        return configured.encode()
    return load_or_create_secret(path)


def load_or_create_secret(path: Path) -> bytes:
    """The credential secret kept in `path` (mode 0600), made on first use. A file that holds
    less than `MIN_SECRET_BYTES` is refused, never used (an empty key would make the service
    password public)."""
    try:
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        secret = _create_secret(path)
    if len(secret) < MIN_SECRET_BYTES:
        raise SettingsInvalid(
            f"the device credential secret in {path} holds {len(secret)} bytes, fewer than "
            f"{MIN_SECRET_BYTES}: the file is damaged. Restore it from a backup (every device "
            "password is derived from it), or delete it and give every device a new credential"
        )
    if path.stat().st_mode & 0o077:
        logger.warning(
            "%s (the device credential secret) can be read by other users: chmod 600 it", path
        )
    return secret


def _create_secret(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32).encode()
    # Written whole to a private temporary file, flushed, then linked into place: the secret
    # file appears complete or not at all, and of two processes starting together the first
    # link wins and both use its secret.
    descriptor, temporary = tempfile.mkstemp(prefix=".secret-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(secret + b"\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return path.read_bytes().strip()
    finally:
        os.unlink(temporary)
    return secret
