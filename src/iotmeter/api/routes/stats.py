"""System statistics."""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter
from pydantic import BaseModel

from iotmeter.api.deps import SessionDep, StateDep
from iotmeter.db.base import utcnow
from iotmeter.repositories.alerts import AlertRepository
from iotmeter.repositories.devices import DeviceRepository

router = APIRouter(tags=["stats"])


class DeviceStats(BaseModel):
    total: int
    online: int
    online_window_s: float
    by_type: dict[str, int]


class MessageStats(BaseModel):
    received: int
    readings_received: int
    stored: int
    rejected: int
    rejected_by_reason: dict[str, int]
    ingest_rate_per_s: float
    last_message_at: datetime | None


class Stats(BaseModel):
    started_at: datetime
    devices: DeviceStats
    messages: MessageStats
    active_alerts_by_severity: dict[str, int]
    backends: dict[str, str]


@router.get("/stats", summary="System statistics")
async def stats(state: StateDep, session: SessionDep) -> Stats:
    """Devices, ingestion counters since start (messages = MQTT messages; readings = reading
    sets, a batch message holds several), active alerts and the backends in use."""
    devices = DeviceRepository(session)
    by_type = await devices.count_by_type()
    window = state.settings.online_window_s
    online = await devices.count_seen_since(utcnow() - timedelta(seconds=window))
    counters = state.stats
    return Stats(
        started_at=counters.started_at,
        devices=DeviceStats(
            total=sum(by_type.values()), online=online, online_window_s=window, by_type=by_type
        ),
        messages=MessageStats(
            received=counters.messages_received,
            readings_received=counters.readings_received,
            stored=counters.readings_stored,
            rejected=counters.rejected.total(),
            rejected_by_reason=dict(counters.rejected),
            ingest_rate_per_s=round(counters.rate_per_second(), 3),
            last_message_at=counters.last_message_at,
        ),
        active_alerts_by_severity=await AlertRepository(session).count_active_by_severity(),
        backends={
            "database": state.database.dialect,
            "timeseries": state.timeseries.backend,
            "archive": state.archive.backend,
            "mqtt": state.broker.describe() if state.broker else "off",
        },
    )
