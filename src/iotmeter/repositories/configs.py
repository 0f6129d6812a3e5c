"""SQL for device configuration keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.db.base import utcnow
from iotmeter.db.models import DeviceConfig


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

    async def get(self, device_id: str, key: str) -> DeviceConfig | None:
        return await self.session.get(DeviceConfig, (device_id, key))

    async def put(self, device_id: str, key: str, value: Any) -> DeviceConfig:
        config = await self.get(device_id, key)
        if config is None:
            config = DeviceConfig(device_id=device_id, key=key, value=value, updated_at=utcnow())
            self.session.add(config)
        else:
            config.value = value
            config.updated_at = utcnow()
        await self.session.flush()
        return config

    async def delete(self, config: DeviceConfig) -> None:
        await self.session.delete(config)
        await self.session.flush()

    async def delete_all(self, device_id: str) -> None:
        await self.session.execute(delete(DeviceConfig).where(DeviceConfig.device_id == device_id))
