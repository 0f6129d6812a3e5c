"""SQL for the series each device has begun (`device_series`)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.db.models import DeviceSeries


def _epoch_us(moment: datetime) -> int:
    if moment.tzinfo is None:  # SQLite gives naive UTC back
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1_000_000)


class SeriesRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def of_devices(self, device_ids: Iterable[str]) -> dict[str, dict[str, int]]:
        """Each device's fields, with when each began (epoch microseconds)."""
        ids = list(device_ids)
        found: dict[str, dict[str, int]] = {device_id: {} for device_id in ids}
        for start in range(0, len(ids), 500):
            rows = await self.session.execute(
                select(
                    DeviceSeries.device_id, DeviceSeries.field, DeviceSeries.first_seen_at
                ).where(DeviceSeries.device_id.in_(ids[start : start + 500]))
            )
            for device_id, field, first_seen_at in rows:
                found[device_id][field] = _epoch_us(first_seen_at)
        return found

    async def add(self, began: dict[str, dict[str, int]]) -> None:
        """Record new series (device -> field -> epoch microseconds); known ones stay."""
        rows = [
            {
                "device_id": device_id,
                "field": field,
                "first_seen_at": datetime.fromtimestamp(epoch_us / 1_000_000, UTC),
            }
            for device_id, fields in began.items()
            for field, epoch_us in fields.items()
        ]
        if not rows:
            return
        dialect = self.session.get_bind().dialect.name
        insert_ = postgresql_insert if dialect == "postgresql" else sqlite_insert
        for start in range(0, len(rows), 1000):
            await self.session.execute(
                insert_(DeviceSeries).on_conflict_do_nothing(), rows[start : start + 1000]
            )
