"""Notifications for alert changes made through the API (raised, acknowledged, resolved by a
person), queued in the request's transaction like the sink's."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.db.base import utcnow
from iotmeter.db.models import DeviceAlert, Notification, NotificationChannel

SEVERITY_ORDER = {"info": 0, "warning": 1, "critical": 2}


def wants(
    min_severity: str, rule_ids: Collection[int] | None, severity: str, rule_id: int | None
) -> bool:
    """Whether a channel (its `min_severity` and `rule_ids`) takes an alert of this severity
    and rule (a channel limited to rules takes no manual alert)."""
    if SEVERITY_ORDER.get(severity, 0) < SEVERITY_ORDER.get(min_severity, 0):
        return False
    return rule_ids is None or (rule_id is not None and rule_id in rule_ids)


def notification_rows(
    channel_ids: Iterable[int], event: str, alert_id: int, data: dict[str, Any]
) -> list[dict[str, Any]]:
    """One outbox row per channel for an event: a new `webhook-id` each, due now."""
    now = utcnow()
    payload = {"type": event, "timestamp": now.isoformat(), "data": data}
    return [
        {
            "channel_id": channel_id,
            "event_id": f"msg_{uuid.uuid4().hex}",
            "event": event,
            "alert_id": alert_id,
            "payload": payload,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for channel_id in channel_ids
    ]


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
        channel.id
        for channel in channels
        if wants(channel.min_severity, channel.rule_ids, alert.severity, alert.rule_id)
    ]
    if not wanted:
        return 0
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
    await session.execute(insert(Notification), notification_rows(wanted, event, alert.id, data))
    return len(wanted)
