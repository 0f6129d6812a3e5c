"""Alert life cycle: active -> acknowledged -> resolved (or active -> resolved); each change
queues its notifications (alerting/outbox.py) in the same transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.alerting.outbox import queue_for_alert
from iotmeter.db.base import utcnow
from iotmeter.db.models import DeviceAlert
from iotmeter.errors import Conflict, NotFound
from iotmeter.repositories.alerts import AlertRepository
from iotmeter.services.devices import get_device


async def get_alert(session: AsyncSession, alert_id: int) -> DeviceAlert:
    alert = await AlertRepository(session).get(alert_id)
    if alert is None:
        raise NotFound(f"alert {alert_id} not found")
    return alert


async def create_alert(session: AsyncSession, fields: dict[str, Any]) -> DeviceAlert:
    """Raise an alert on an existing device."""
    await get_device(session, fields["device_id"])
    alert = DeviceAlert(**fields, status="active", created_at=utcnow())
    alert = await AlertRepository(session).add(alert)
    await queue_for_alert(session, alert, "alert.fired")
    return alert


async def acknowledge_alert(session: AsyncSession, alert_id: int) -> DeviceAlert:
    """Only an active alert can be acknowledged."""
    alert = await AlertRepository(session).change_status(
        alert_id,
        allowed_from=("active",),
        status="acknowledged",
        stamp="acknowledged_at",
        at=utcnow(),
    )
    if alert is None:
        current = await get_alert(session, alert_id)
        raise Conflict(
            f"alert {alert_id} is {current.status}; only an active alert can be acknowledged"
        )
    await queue_for_alert(session, alert, "alert.acknowledged")
    return alert


async def resolve_alert(session: AsyncSession, alert_id: int) -> DeviceAlert:
    """An active or acknowledged alert can be resolved, once."""
    alert = await AlertRepository(session).change_status(
        alert_id,
        allowed_from=("active", "acknowledged"),
        status="resolved",
        stamp="resolved_at",
        at=utcnow(),
    )
    if alert is None:
        current = await get_alert(session, alert_id)
        raise Conflict(f"alert {alert_id} is already resolved (at {current.resolved_at})")
    await queue_for_alert(session, alert, "alert.resolved")
    return alert
