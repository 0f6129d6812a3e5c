"""The registry's figures for the metrics: one statement, one round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import String, cast, func, literal, null, select, true, union_all
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.selectable import CompoundSelect

from iotmeter.db.models import Device, DeviceAlert, Notification


@dataclass
class RegistryFigures:
    """Devices by (type, status), online and connected devices, alerts not resolved by
    severity, notifications by status."""

    devices: dict[tuple[str, str], int] = field(default_factory=dict)
    online: int = 0
    connected: int = 0
    alerts_active: dict[str, int] = field(default_factory=dict)
    notifications: dict[str, int] = field(default_factory=dict)


def _figures_statement(online_since: datetime) -> CompoundSelect[str, str | None, str | None, int]:
    text = String(32)
    no_text = cast(null(), text)
    return union_all(
        select(literal("devices"), Device.type, Device.status, func.count()).group_by(
            Device.type, Device.status
        ),
        select(literal("online"), no_text, no_text, func.count()).where(
            Device.last_seen_at >= online_since
        ),
        select(literal("connected"), no_text, no_text, func.count()).where(
            Device.connected == true()
        ),
        select(literal("alerts"), DeviceAlert.severity, no_text, func.count())
        .where(DeviceAlert.status != "resolved")
        .group_by(DeviceAlert.severity),
        select(literal("notifications"), Notification.status, no_text, func.count()).group_by(
            Notification.status
        ),
    )


async def read_registry_figures(
    connection: AsyncConnection, online_since: datetime
) -> RegistryFigures:
    figures = RegistryFigures()
    for kind, first, second, count in await connection.execute(_figures_statement(online_since)):
        number = int(count or 0)
        if kind == "devices":
            figures.devices[str(first), str(second)] = number
        elif kind == "online":
            figures.online = number
        elif kind == "connected":
            figures.connected = number
        elif kind == "alerts":
            figures.alerts_active[str(first)] = number
        else:
            figures.notifications[str(first)] = number
    return figures
