"""SQL for device alerts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.db.base import rowcount
from iotmeter.db.models import DeviceAlert


class AlertRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, alert_id: int) -> DeviceAlert | None:
        return await self.session.get(DeviceAlert, alert_id)

    async def add(self, alert: DeviceAlert) -> DeviceAlert:
        self.session.add(alert)
        await self.session.flush()
        return alert

    async def change_status(
        self,
        alert_id: int,
        *,
        allowed_from: Sequence[str],
        status: str,
        stamp: Literal["acknowledged_at", "resolved_at"],
        at: datetime,
    ) -> DeviceAlert | None:
        """Move the alert to `status` and set `stamp`, only if its status is in `allowed_from`.

        One conditional UPDATE, so of two requests at once only one can make the change.
        None when nothing changed: no such alert, or it is in another status.
        """
        return await self.session.scalar(
            update(DeviceAlert)
            .where(DeviceAlert.id == alert_id, DeviceAlert.status.in_(allowed_from))
            .values({"status": status, stamp: at})
            .returning(DeviceAlert),
            execution_options={"populate_existing": True},
        )

    async def list(
        self,
        *,
        device_id: str | None = None,
        status: str | None = None,
        severity: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int,
        offset: int,
    ) -> tuple[Sequence[DeviceAlert], int]:
        conditions = []
        if device_id is not None:
            conditions.append(DeviceAlert.device_id == device_id)
        if status is not None:
            conditions.append(DeviceAlert.status == status)
        if severity is not None:
            conditions.append(DeviceAlert.severity == severity)
        if since is not None:
            conditions.append(DeviceAlert.created_at >= since)
        if until is not None:
            conditions.append(DeviceAlert.created_at < until)
        total = await self.session.scalar(
            select(func.count()).select_from(DeviceAlert).where(*conditions)
        )
        rows = await self.session.scalars(
            select(DeviceAlert)
            .where(*conditions)
            .order_by(DeviceAlert.created_at.desc(), DeviceAlert.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return rows.all(), total or 0

    async def count_active_by_severity(self) -> dict[str, int]:
        rows = await self.session.execute(
            select(DeviceAlert.severity, func.count())
            .where(DeviceAlert.status != "resolved")
            .group_by(DeviceAlert.severity)
        )
        return {str(key): int(count) for key, count in rows}

    async def delete_resolved_before(self, cutoff: datetime, *, limit: int) -> int:
        """Delete at most `limit` alerts resolved before `cutoff`; the number deleted.

        Only `resolved` ones: an active or acknowledged alert is never deleted, whatever its
        age. Nothing references an alert by foreign key (notifications keep their own copy of
        the alert in their payload), so a deleted alert leaves nothing dangling that breaks.
        """
        chosen = (
            select(DeviceAlert.id)
            .where(DeviceAlert.status == "resolved", DeviceAlert.resolved_at < cutoff)
            .limit(limit)
        )
        result = await self.session.execute(
            delete(DeviceAlert).where(DeviceAlert.id.in_(chosen.scalar_subquery())),
            execution_options={"synchronize_session": False},
        )
        return rowcount(result)
