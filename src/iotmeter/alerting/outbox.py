"""Notifications for alert changes made through the API (raised, acknowledged, resolved by a
person), queued in the request's transaction like the sink's."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.alerting.book import SEVERITY_ORDER
from iotmeter.db.base import utcnow
from iotmeter.db.models import DeviceAlert, Notification, NotificationChannel


def _iso(moment: Any) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


async def queue_for_alert(session: AsyncSession, alert: DeviceAlert, event: str) -> int:
    """Queue `event` (`alert.fired`, `alert.acknowledged`, `alert.resolved`) for every enabled
    channel that wants the alert: its severity, and its rule (a channel limited to rules gets
    no manual alerts). Returns how many were queued."""
    channels = (
        await session.scalars(
            select(NotificationChannel).where(NotificationChannel.enabled.is_(True))
        )
    ).all()
    wanted = [
        channel
        for channel in channels
        if SEVERITY_ORDER.get(alert.severity, 0) >= SEVERITY_ORDER.get(channel.min_severity, 0)
        and (
            channel.rule_ids is None
            or (alert.rule_id is not None and alert.rule_id in channel.rule_ids)
        )
    ]
    if not wanted:
        return 0
    now = utcnow()
    data = {
        "alert_id": alert.id,
        "rule_id": alert.rule_id,
        "device_id": alert.device_id,
        "field": alert.field,
        "severity": alert.severity,
        "status": alert.status,
        "message": alert.message,
        "value": alert.value,
        "threshold": alert.threshold,
        "first_breach_at": _iso(alert.first_breach_at),
        "last_breach_at": _iso(alert.last_breach_at),
        "acknowledged_at": _iso(alert.acknowledged_at),
        "resolved_at": _iso(alert.resolved_at),
        "by": "api",
    }
    await session.execute(
        insert(Notification),
        [
            {
                "channel_id": channel.id,
                "event_id": f"msg_{uuid.uuid4().hex}",
                "event": event,
                "alert_id": alert.id,
                "payload": {"type": event, "timestamp": now.isoformat(), "data": data},
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for channel in wanted
        ],
    )
    return len(wanted)
