"""SQL for device configuration keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.db.base import utcnow
from iotmeter.db.models import Device, DeviceConfig


class ConfigRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def list(self, device_id: str) -> Sequence[DeviceConfig]:
        rows = await self.session.scalars(
            select(DeviceConfig)
            .where(DeviceConfig.device_id == device_id)
            .order_by(DeviceConfig.key)
        )
        return rows.all()

    async def lock(self, device_id: str) -> None:
        """Hold the device's row until the transaction ends, so whole-configuration writes of
        one device take turns (PostgreSQL; SQLite lets one writer in at a time anyway)."""
        await self.session.execute(
            select(Device.id).where(Device.id == device_id).with_for_update()
        )

    async def get(self, device_id: str, key: str) -> DeviceConfig | None:
        return await self.session.get(DeviceConfig, (device_id, key))

    async def put(self, device_id: str, key: str, value: Any) -> DeviceConfig:
        """Insert or overwrite one key.

        One upsert statement rather than read-then-write: two requests setting the same new
        key at once would otherwise both insert, and one would fail on the primary key.
        """
        insert = (
            postgresql_insert
            if self.session.get_bind().dialect.name == "postgresql"
            else sqlite_insert
        )
        statement = insert(DeviceConfig).values(
            device_id=device_id, key=key, value=value, updated_at=utcnow()
        )
        statement = statement.on_conflict_do_update(
            index_elements=[DeviceConfig.device_id, DeviceConfig.key],
            set_={"value": statement.excluded.value, "updated_at": statement.excluded.updated_at},
        )
        config: DeviceConfig | None = await self.session.scalar(
            statement.returning(DeviceConfig),
            execution_options={"populate_existing": True},
        )
        assert config is not None  # an upsert always returns its row
        return config

    async def delete(self, device_id: str, key: str) -> bool:
        """Delete one key; False if it was not there (or another request deleted it first)."""
        deleted = await self.session.scalar(
            delete(DeviceConfig)
            .where(DeviceConfig.device_id == device_id, DeviceConfig.key == key)
            .returning(DeviceConfig.key)
        )
        return deleted is not None

    async def count(self, device_id: str) -> int:
        count = await self.session.scalar(
            select(func.count())
            .select_from(DeviceConfig)
            .where(DeviceConfig.device_id == device_id)
        )
        return count or 0

    async def insert_many(self, device_id: str, values: dict[str, Any]) -> None:
        """New keys, in one multi-row INSERT (the caller deleted what was there)."""
        if not values:
            return
        now = utcnow()
        await self.session.execute(
            insert(DeviceConfig).values(
                [
                    {"device_id": device_id, "key": key, "value": value, "updated_at": now}
                    for key, value in values.items()
                ]
            )
        )

    async def delete_all(self, device_id: str) -> None:
        await self.session.execute(delete(DeviceConfig).where(DeviceConfig.device_id == device_id))
