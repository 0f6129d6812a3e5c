"""SQL for API keys and the audit log."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from iotmeter.db.base import rowcount, utcnow
from iotmeter.db.models import ApiKey, AuditEntry

KEYS_CHANNEL = "iotmeter_api_keys"
"""PostgreSQL notification channel (trigger `api_key_changed`, migration 0005): the payload is
the id of a key that changed (revoked, expired, deleted)."""


class ApiKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(
        self, *, key_id: str, secret_hash: str, name: str, role: str, expires_at: datetime | None
    ) -> ApiKey:
        key = ApiKey(
            key_id=key_id,
            secret_hash=secret_hash,
            name=name,
            role=role,
            created_at=utcnow(),
            expires_at=expires_at,
        )
        self.session.add(key)
        await self.session.flush()
        return key

    async def list(self) -> Sequence[ApiKey]:
        return (await self.session.scalars(select(ApiKey).order_by(ApiKey.id))).all()

    async def get(self, key_id: str) -> ApiKey | None:
        key: ApiKey | None = await self.session.scalar(
            select(ApiKey).where(ApiKey.key_id == key_id)
        )
        return key

    async def usable_count(self) -> int:
        now = utcnow()
        count = await self.session.scalar(
            select(func.count())
            .select_from(ApiKey)
            .where(
                ApiKey.revoked_at.is_(None),
                (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now),
            )
        )
        return count or 0


class KeyReader:
    """The per-request lookup, on a plain connection (no ORM session)."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def find(
        self, key_id: str
    ) -> tuple[str, str, str, datetime | None, datetime | None] | None:
        """(secret hash, name, role, expires at, revoked at) of a key id."""
        row = (
            await self.connection.execute(
                select(
                    ApiKey.secret_hash,
                    ApiKey.name,
                    ApiKey.role,
                    ApiKey.expires_at,
                    ApiKey.revoked_at,
                ).where(ApiKey.key_id == key_id)
            )
        ).first()
        return None if row is None else (row[0], row[1], row[2], row[3], row[4])


class AuditRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, **fields: object) -> None:
        self.session.add(AuditEntry(at=utcnow(), **fields))

    async def list(
        self, *, actor: str | None, since: datetime | None, limit: int, offset: int
    ) -> tuple[Sequence[AuditEntry], int]:
        conditions = []
        if actor is not None:
            conditions.append(AuditEntry.actor == actor)
        if since is not None:
            conditions.append(AuditEntry.at >= since)
        total = await self.session.scalar(
            select(func.count()).select_from(AuditEntry).where(*conditions)
        )
        rows = await self.session.scalars(
            select(AuditEntry)
            .where(*conditions)
            .order_by(AuditEntry.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return rows.all(), total or 0

    async def expire(self, older_than: datetime) -> int:
        result = await self.session.execute(delete(AuditEntry).where(AuditEntry.at < older_than))
        return rowcount(result)


async def revoke(session: AsyncSession, key_id: str) -> bool:
    """Revoke a key (kept, marked revoked); False when no usable key has that id.

    On PostgreSQL a trigger (migration 0005) notifies every process caching keys
    (`security/key_cache.py`); the notification is delivered when the transaction commits."""
    result = await session.execute(
        update(ApiKey)
        .where(ApiKey.key_id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .returning(ApiKey.key_id)
    )
    return result.first() is not None


async def note_use(session: AsyncSession, used: dict[str, datetime]) -> None:
    """Move each key's last_used_at forward to the time given (never back)."""
    for key_id, at in used.items():
        await session.execute(
            update(ApiKey)
            .where(
                ApiKey.key_id == key_id,
                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < at),
            )
            .values(last_used_at=at)
        )
