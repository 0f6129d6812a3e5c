"""Resolved alerts past `IOTMETER_RESOLVED_ALERT_RETENTION_DAYS` are deleted, in chunks; open ones
never. On PostgreSQL and SQLite, with the clock passed in (no waiting)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select

from iotmeter.db.engine import Database, build_engine
from iotmeter.db.models import Device, DeviceAlert, Notification, NotificationChannel
from iotmeter.repositories.alerts import AlertRepository
from iotmeter.services.housekeeping import expire_resolved_alerts
from tests.conftest import make_settings

NOW = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)
"""The fake clock: every alert's times are set relative to it."""


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    opened = Database(build_engine(database_url))
    async with opened.transaction() as session:
        session.add(Device(id="meter-1", name="Meter 1", type="power"))
    try:
        yield opened
    finally:
        await opened.close()


def state_for(database: Database, database_url: str, tmp_path: Path, **settings: Any) -> Any:
    """What `expire_resolved_alerts` reads of the app state: its settings and database."""
    return SimpleNamespace(
        settings=make_settings(database_url, tmp_path, **settings), database=database
    )


def alert(status: str, *, age_days: float, message: str) -> DeviceAlert:
    """An alert created `age_days + 1` days before NOW and, when it has been, acknowledged or
    resolved `age_days` before NOW."""
    at = NOW - timedelta(days=age_days)
    return DeviceAlert(
        device_id="meter-1",
        severity="warning",
        status=status,
        message=message,
        created_at=at - timedelta(days=1),
        acknowledged_at=at if status == "acknowledged" else None,
        resolved_at=at if status == "resolved" else None,
    )


async def add(database: Database, *alerts: DeviceAlert) -> list[int]:
    async with database.transaction() as session:
        session.add_all(alerts)
        await session.flush()
        return [item.id for item in alerts]


async def messages_left(database: Database) -> set[str]:
    async with database.transaction() as session:
        return set(await session.scalars(select(DeviceAlert.message)))


async def test_only_alerts_resolved_before_the_retention_are_deleted(
    database: Database, database_url: str, tmp_path: Path
) -> None:
    await add(
        database,
        alert("resolved", age_days=91, message="resolved 91 days ago"),
        alert("resolved", age_days=400, message="resolved 400 days ago"),
        alert("resolved", age_days=89, message="resolved 89 days ago"),
        alert("active", age_days=500, message="active for 500 days"),
        alert("acknowledged", age_days=500, message="acknowledged 500 days ago"),
    )
    state = state_for(database, database_url, tmp_path)  # the default: 90 days
    assert state.settings.resolved_alert_retention_days == 90

    assert await expire_resolved_alerts(state, now=NOW) == 2
    assert await messages_left(database) == {
        "resolved 89 days ago",
        "active for 500 days",
        "acknowledged 500 days ago",
    }
    # A day later the next one is due; the open ones stay, whatever their age.
    assert await expire_resolved_alerts(state, now=NOW + timedelta(days=1, seconds=1)) == 1
    assert await messages_left(database) == {"active for 500 days", "acknowledged 500 days ago"}
    assert await expire_resolved_alerts(state, now=NOW + timedelta(days=3650)) == 0


async def test_retention_zero_keeps_resolved_alerts_forever(
    database: Database, database_url: str, tmp_path: Path
) -> None:
    await add(database, alert("resolved", age_days=4000, message="ancient"))
    state = state_for(database, database_url, tmp_path, resolved_alert_retention_days=0)
    assert await expire_resolved_alerts(state, now=NOW) == 0
    assert await messages_left(database) == {"ancient"}


async def test_a_backlog_is_deleted_in_chunks_of_its_own_transactions(
    database: Database, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await add(
        database,
        *(alert("resolved", age_days=100 + i, message=f"old {i}") for i in range(25)),
        alert("resolved", age_days=10, message="recent"),
        alert("active", age_days=300, message="open"),
    )
    chunks: list[int] = []
    delete_chunk = AlertRepository.delete_resolved_before

    async def counted(self: AlertRepository, cutoff: datetime, *, limit: int) -> int:
        assert self.session.in_transaction()
        deleted = await delete_chunk(self, cutoff, limit=limit)
        chunks.append(deleted)
        return deleted

    monkeypatch.setattr(AlertRepository, "delete_resolved_before", counted)
    state = state_for(database, database_url, tmp_path)
    assert await expire_resolved_alerts(state, now=NOW, chunk_size=10) == 25
    assert chunks == [10, 10, 5]
    assert await messages_left(database) == {"recent", "open"}


async def test_a_deleted_alert_leaves_its_notifications_deliverable(
    database: Database, database_url: str, tmp_path: Path
) -> None:
    # Notifications name the alert by id without a foreign key, with the alert in their
    # payload: the outbox keeps them, and deleting the alert does not fail on them.
    (alert_id,) = await add(database, alert("resolved", age_days=120, message="gone"))
    async with database.transaction() as session:
        channel = NotificationChannel(name="ops", kind="webhook", url="https://example.test/h")
        session.add(channel)
        await session.flush()
        session.add(
            Notification(
                channel_id=channel.id,
                event_id="evt-1",
                event="alert.resolved",
                alert_id=alert_id,
                payload={"data": {"alert_id": alert_id, "message": "gone"}},
                status="pending",
                next_attempt_at=NOW,
                created_at=NOW,
            )
        )
    state = state_for(database, database_url, tmp_path)
    assert await expire_resolved_alerts(state, now=NOW) == 1
    async with database.transaction() as session:
        assert await session.get(DeviceAlert, alert_id) is None
        pending = await session.scalar(
            select(func.count()).select_from(Notification).where(Notification.alert_id == alert_id)
        )
    assert pending == 1
