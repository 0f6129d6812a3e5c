"""SQL that an export needs from the registry: which devices, and which fields each has."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from iotmeter.db.models import Device, DeviceSeries

_CHUNK = 500


async def existing_devices(connection: AsyncConnection, device_ids: Sequence[str]) -> set[str]:
    """The ids among `device_ids` that are registered."""
    found: set[str] = set()
    ids = list(device_ids)
    for start in range(0, len(ids), _CHUNK):
        rows = await connection.execute(
            select(Device.id).where(Device.id.in_(ids[start : start + _CHUNK]))
        )
        found.update(row[0] for row in rows)
    return found


async def devices_of_type(connection: AsyncConnection, device_type: str) -> list[str]:
    """Every registered device of this type, ordered by id (code point order on every database)."""
    rows = await connection.execute(select(Device.id).where(Device.type == device_type))
    return sorted(row[0] for row in rows)


async def series_fields(
    connection: AsyncConnection, device_ids: Sequence[str]
) -> dict[str, set[str]]:
    """The fields each device has begun a series of (`device_series`)."""
    found: dict[str, set[str]] = {device_id: set() for device_id in device_ids}
    ids = list(device_ids)
    for start in range(0, len(ids), _CHUNK):
        rows = await connection.execute(
            select(DeviceSeries.device_id, DeviceSeries.field).where(
                DeviceSeries.device_id.in_(ids[start : start + _CHUNK])
            )
        )
        for device_id, field in rows:
            found[device_id].add(field)
    return found
