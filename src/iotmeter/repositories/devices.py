"""SQL for devices."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.db.models import Device


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class DeviceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, device_id: str) -> Device | None:
        return await self.session.get(Device, device_id)

    async def add(self, device: Device) -> Device:
        self.session.add(device)
        await self.session.flush()
        return device

    async def list(
        self,
        *,
        type: str | None = None,
        status: str | None = None,
        location: str | None = None,
        search: str | None = None,
        limit: int,
        offset: int,
    ) -> tuple[Sequence[Device], int]:
        conditions = []
        if type is not None:
            conditions.append(Device.type == type)
        if status is not None:
            conditions.append(Device.status == status)
        if location is not None:
            conditions.append(Device.location == location)
        if search:
            pattern = f"%{_escape_like(search.lower())}%"
            conditions.append(
                or_(
                    func.lower(Device.id).like(pattern, escape="\\"),
                    func.lower(Device.name).like(pattern, escape="\\"),
                )
            )
        total = await self.session.scalar(
            select(func.count()).select_from(Device).where(*conditions)
        )
        rows = await self.session.scalars(
            select(Device).where(*conditions).order_by(Device.id).limit(limit).offset(offset)
        )
        return rows.all(), total or 0

    async def delete(self, device: Device) -> None:
        await self.session.delete(device)
        await self.session.flush()

    async def existing_ids(self, device_ids: Iterable[str]) -> set[str]:
        ids = list(device_ids)
        if not ids:
            return set()
        rows = await self.session.scalars(select(Device.id).where(Device.id.in_(ids)))
        return set(rows.all())

    async def touch_last_seen(self, seen: dict[str, datetime]) -> None:
        """Move each device's last_seen_at forward (never back) to the time given."""
        for device_id, seen_at in seen.items():
            await self.session.execute(
                update(Device)
                .where(
                    Device.id == device_id,
                    or_(Device.last_seen_at.is_(None), Device.last_seen_at < seen_at),
                )
                .values(last_seen_at=seen_at)
                .execution_options(synchronize_session=False)
            )

    async def count_by_type(self) -> dict[str, int]:
        rows = await self.session.execute(select(Device.type, func.count()).group_by(Device.type))
        return dict(rows.tuples())

    async def count_seen_since(self, since: datetime) -> int:
        count = await self.session.scalar(
            select(func.count()).select_from(Device).where(Device.last_seen_at >= since)
        )
        return count or 0
