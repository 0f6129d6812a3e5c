"""SQL for the dead-letter store."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from sqlalchemy import Select, delete, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.db.base import rowcount, utcnow
from iotmeter.db.models import DeadLetter
from iotmeter.readings import Rejection


def _text(value: str) -> str:
    """Text any database keeps: PostgreSQL refuses NUL and lone surrogates in text columns."""
    return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


class DeadLetterRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add_many(self, rejections: Sequence[Rejection], *, scope: str = "") -> None:
        """Keep each rejection once: the same message refused again (a redelivery, a replay
        of the spool) has the same key and is not stored twice. `scope` keeps apart the same
        record parked by different sinks."""
        if not rejections:
            return
        now = utcnow()
        rows = {}
        for rejection in rejections:
            key = rejection.key(scope)
            rows[key] = {
                "key": key,
                "received_at": (
                    datetime.fromtimestamp(rejection.received_at_us / 1e6, UTC)
                    if rejection.received_at_us
                    else now
                ),
                "topic": _text(rejection.topic),
                "device_id": rejection.device_id,
                "reason": rejection.reason.value,
                "detail": _text(rejection.detail),
                "payload": rejection.payload,
                "payload_size": rejection.payload_size,
                "payload_sha256": rejection.payload_sha256,
            }
        postgresql = self.session.get_bind().dialect.name == "postgresql"
        insert = postgresql_insert if postgresql else sqlite_insert
        await self.session.execute(
            insert(DeadLetter).on_conflict_do_nothing(index_elements=["key"]), list(rows.values())
        )

    async def list(
        self, *, reason: str | None, device_id: str | None, limit: int, offset: int
    ) -> tuple[Sequence[DeadLetterSummary], int]:
        """A page, newest first; each row with the head of its payload only (`PREVIEW_BYTES`)."""
        conditions = []
        if reason is not None:
            conditions.append(DeadLetter.reason == reason)
        if device_id is not None:
            conditions.append(DeadLetter.device_id == device_id)
        total = await self.session.scalar(
            select(func.count()).select_from(DeadLetter).where(*conditions)
        )
        rows = await self.session.execute(
            _summary()
            .where(*conditions)
            .order_by(DeadLetter.received_at.desc(), DeadLetter.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return [DeadLetterSummary._make(row) for row in rows], total or 0

    async def summary(self, letter_id: int) -> DeadLetterSummary | None:
        row = (await self.session.execute(_summary().where(DeadLetter.id == letter_id))).first()
        return None if row is None else DeadLetterSummary._make(row)

    async def payload(self, letter_id: int) -> bytes | None:
        payload: bytes | None = await self.session.scalar(
            select(DeadLetter.payload).where(DeadLetter.id == letter_id)
        )
        return payload

    async def expire(self, *, older_than: datetime, keep_newest: int) -> int:
        """Delete dead letters received before `older_than`, then all but the newest
        `keep_newest`; the number deleted."""
        result = await self.session.execute(
            delete(DeadLetter).where(DeadLetter.received_at < older_than)
        )
        deleted = rowcount(result)
        cutoff = await self.session.scalar(
            select(DeadLetter.id).order_by(DeadLetter.id.desc()).offset(keep_newest).limit(1)
        )
        if cutoff is not None:
            result = await self.session.execute(delete(DeadLetter).where(DeadLetter.id <= cutoff))
            deleted += rowcount(result)
        return deleted


PREVIEW_BYTES = 256
"""Bytes of the payload a listing shows; the whole stored payload is one request away."""


class DeadLetterSummary(NamedTuple):
    id: int
    received_at: datetime
    topic: str
    device_id: str | None
    reason: str
    detail: str
    preview: bytes
    stored_size: int
    payload_size: int | None


def _summary() -> Select[tuple[int, datetime, str, str | None, str, str, bytes, int, int | None]]:
    return select(
        DeadLetter.id,
        DeadLetter.received_at,
        DeadLetter.topic,
        DeadLetter.device_id,
        DeadLetter.reason,
        DeadLetter.detail,
        func.substr(DeadLetter.payload, 1, PREVIEW_BYTES),
        func.length(DeadLetter.payload),
        DeadLetter.payload_size,
    )
