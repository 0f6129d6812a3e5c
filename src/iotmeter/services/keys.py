"""API key rules: creation (the key shown once), revocation, the first start's admin key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.db.base import utcnow
from iotmeter.db.engine import Database
from iotmeter.db.models import ApiKey
from iotmeter.errors import NotFound, ValidationFailed
from iotmeter.repositories.api_keys import ApiKeyRepository, note_use, revoke
from iotmeter.security.keys import ROLE_NAMES, new_key

if TYPE_CHECKING:
    from iotmeter.state import AppState

logger = logging.getLogger(__name__)

BOOTSTRAP_NAME = "bootstrap-admin"


async def create_key(
    session: AsyncSession, *, name: str, role: str, expires_at: datetime | None
) -> tuple[ApiKey, str]:
    """A new key and its text (to show once; only its hash is stored)."""
    if role not in ROLE_NAMES:
        raise ValidationFailed(f"role {role!r}: use one of {', '.join(ROLE_NAMES)}")
    if expires_at is not None and expires_at <= utcnow():
        raise ValidationFailed("expires_at is in the past; give a later time or none")
    made = new_key()
    key = await ApiKeyRepository(session).add(
        key_id=made.key_id,
        secret_hash=made.secret_hash,
        name=name,
        role=role,
        expires_at=expires_at,
    )
    return key, made.key


REVOKED_KEYS = "iotmeter.revoked_keys"
"""`session.info` entry: ids of keys revoked in the session's transaction; the API's session
dependency evicts them from the key cache once it has committed."""


async def revoke_key(session: AsyncSession, key_id: str) -> None:
    if not await revoke(session, key_id):
        raise NotFound(f"no usable key {key_id!r}; list the keys with GET /api/v1/keys")
    session.info.setdefault(REVOKED_KEYS, set()).add(key_id)


async def bootstrap_admin_key(database: Database, path: Path) -> Path | None:
    """On a first start (no usable key at all): make an admin key and write it to `path`,
    readable by the owner only. Returns the path written, or None when keys exist."""
    async with database.transaction() as session:
        if await ApiKeyRepository(session).usable_count() > 0:
            return None
        _key, text = await create_key(session, name=BOOTSTRAP_NAME, role="admin", expires_at=None)
        _write_private(path, text + "\n")
    return path


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600 from its creation: never readable by others,
    not even for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


USAGE_FLUSH_S = 30.0


async def record_key_use(state: AppState) -> None:
    """Loops until cancelled: writes each key's last use (`last_used_at`, at most
    `USAGE_FLUSH_S` late; one UPDATE per key used, not one per request). Writes what is left
    when stopped."""
    try:
        while True:
            await asyncio.sleep(USAGE_FLUSH_S)
            await _write_key_use(state)
    finally:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(_write_key_use(state), 5.0)


async def _write_key_use(state: AppState) -> None:
    used = state.key_cache.take_used()
    if not used:
        return
    try:
        async with state.database.transaction() as session:
            await note_use(session, used)
    except Exception as exc:
        state.key_cache.give_back(used)
        logger.warning("could not write the keys' last use, trying again later: %s", exc)
