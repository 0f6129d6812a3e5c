"""SQL for the dead-letter store."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.db.base import utcnow
from iotmeter.db.models import DeadLetter
from iotmeter.ingest.models import Rejection


class DeadLetterRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add_many(self, rejections: Sequence[Rejection]) -> None:
        if not rejections:
            return
        now = utcnow()
        await self.session.execute(
            insert(DeadLetter),
            [
                {
                    "received_at": now,
                    "topic": rejection.topic,
                    "device_id": rejection.device_id,
                    "reason": rejection.reason.value,
                    "detail": rejection.detail,
                    "payload": rejection.payload,
                }
                for rejection in rejections
            ],
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
