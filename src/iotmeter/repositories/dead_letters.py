"""SQL for the dead-letter store."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.db.base import utcnow
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
    ) -> tuple[Sequence[DeadLetter], int]:
        conditions = []
        if reason is not None:
            conditions.append(DeadLetter.reason == reason)
        if device_id is not None:
            conditions.append(DeadLetter.device_id == device_id)
        total = await self.session.scalar(
            select(func.count()).select_from(DeadLetter).where(*conditions)
        )
        rows = await self.session.scalars(
            select(DeadLetter)
            .where(*conditions)
            .order_by(DeadLetter.received_at.desc(), DeadLetter.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return rows.all(), total or 0
