"""System statistics."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from iotmeter.api.deps import SessionDep, StateDep
from iotmeter.config import env_name
from iotmeter.db.base import utcnow
from iotmeter.db.models import AlertRule, DeadLetter, DeviceAlert, Notification
from iotmeter.errors import IotmeterError
from iotmeter.repositories.alerts import AlertRepository
from iotmeter.repositories.device_channel import ChannelRepository
from iotmeter.repositories.devices import DeviceRepository
from iotmeter.state import AppState
from iotmeter.storage.usage import StoreUsage

logger = logging.getLogger(__name__)

router = APIRouter(tags=["stats"])
STALL_SHOWN_AFTER_S = 5.0
STORAGE_CACHE_S = 30.0
"""How long the storage figures are reused: measuring them lists objects and asks SQL for
sizes, which a dashboard polling every few seconds must not repeat each time."""
STORAGE_TIMEOUT_S = 10.0
"""Longest wait for one store's figures; a store that takes longer shows an error instead."""


class DeviceStats(BaseModel):
    total: int
    online: int
    online_window_s: float
    by_type: dict[str, int]


class MessageStats(BaseModel):
    received: int
    stored: int
    rejected: int
    rejected_by_reason: dict[str, int]
    ingest_rate_per_s: float
    last_message_at: datetime | None


class SpoolStats(BaseModel):
    depth: int = Field(description="Messages durable in the spool, not yet in every sink.")
    disk_bytes: int
    max_bytes: int
    full: bool = Field(description="True while iotmeter stops acking because the spool is full.")
    oldest_unconfirmed_age_s: float | None
    lag_by_sink: dict[str, int]
    failing_sinks: dict[str, str]
    stalled_sinks: dict[str, float] = Field(
        description="Sinks with records waiting and no progress, with the seconds since their "
        "last progress (only those past a few seconds)."
    )
    parked_by_sink: dict[str, int] = Field(
        description="Records each sink set aside in the dead letters since start (refused by "
        "the store, or failing again and again): the other sinks kept them."
    )
    intake_held_s: float = Field(
        description="Seconds since start the collector stopped reading from the broker "
        "because a working sink lagged (the broker kept those messages meanwhile)."
    )
    retained_ignored: int = Field(
        description="Messages the broker delivered from its retained store (they had been "
        "delivered live when published): acknowledged, not stored again."
    )
    quarantined_spans: int = Field(
        description="Damaged stretches of spool files met since start (copied to the spool's "
        "`quarantine/` folder; see `/ready`)."
    )
    quarantined_records_lost: int
    client_id: str = Field(description="The collector's MQTT client id.")


class LimitStats(BaseModel):
    """What devices may create, and how often a limit refused something since start."""

    max_devices: int = Field(description="`IOTMETER_MAX_DEVICES` (0: no limit).")
    devices_room: int | None = Field(description="New devices that still fit (null: no limit).")
    max_fields_per_message: int
    max_new_series_per_device_hour: int = Field(description="0: no limit.")
    refused: dict[str, int] = Field(
        description="Reading sets refused since start by each limit: `device_limit`, "
        "`too_many_fields`, `series_limit` (their dead letters say which device)."
    )


LIMIT_REASONS = ("device_limit", "too_many_fields", "series_limit")


class AlertingStats(BaseModel):
    rules_enabled: int
    notifications_by_status: dict[str, int] = Field(
        description="The outbox: `pending` (queued or being retried), `delivered`, `failed` "
        "(gave up after 24 h; retry them by hand)."
    )
    evaluated_events: int = Field(description="Rule events (fired, resolved...) since start.")
    late_readings_skipped: int = Field(
        description="Readings not newer than what a rule had evaluated, since start."
    )


class DeviceChannelStats(BaseModel):
    """Credentials, configuration pushed to devices, and what devices tell back."""

    device_auth: bool = Field(description="Devices must use their own credentials.")
    connected: int = Field(description="Devices whose last status was `online`.")
    config_out_of_sync: int = Field(
        description="Devices that did not report their desired configuration version."
    )
    configs_published: int = Field(description="Desired configurations published since start.")
    status_changes: int = Field(description="Status messages recorded since start.")
    reports: int = Field(description="Reported configurations recorded since start.")
    refused: int = Field(description="Status or report messages sent to the dead letters.")
    broker_accounts: dict[str, Any] | None = Field(
        description="Mosquitto's accounts as iotmeter last reconciled them (null: the embedded "
        "broker, or device authentication off)."
    )


class StoreUsageStats(BaseModel):
    """What one store keeps: the oldest data, the space it takes, how long it keeps data."""

    oldest_at: datetime | None = Field(
        description="Time of the oldest data kept (readings: their device time; dead letters: "
        "when received; alerts: when raised); null when empty or not known."
    )
    bytes_used: int | None = Field(description="Space used in bytes; null when not known.")
    retention_days: float | None = Field(
        description="The retention setting in days; null when data is kept forever."
    )
    records: int | None = Field(
        default=None, description="Rows kept (dead letters, alerts); null for the other stores."
    )
    detail: str | None = Field(
        description="How the figures were obtained, or the error when the store did not answer."
    )


class StorageStats(BaseModel):
    measured_at: datetime = Field(
        description=f"When the figures were measured: they are reused for {STORAGE_CACHE_S:g} s."
    )
    timeseries: StoreUsageStats
    archive: StoreUsageStats
    dead_letters: StoreUsageStats
    alerts: StoreUsageStats


class Stats(BaseModel):
    started_at: datetime
    devices: DeviceStats
    messages: MessageStats
    limits: LimitStats
    alerting: AlertingStats
    device_channel: DeviceChannelStats
    spool: SpoolStats | None
    active_alerts_by_severity: dict[str, int]
    backends: dict[str, str]
    storage: StorageStats


def _spool_stats(state: AppState) -> SpoolStats | None:
    collector = state.collector
    if collector is None:
        return None
    spool, intake = collector.spool, collector.intake
    return SpoolStats(
        depth=spool.depth(),
        disk_bytes=spool.disk_bytes,
        max_bytes=spool.max_bytes,
        full=intake.spool_full_since is not None,
        oldest_unconfirmed_age_s=spool.oldest_unconfirmed_age_s(),
        lag_by_sink=spool.lag(),
        failing_sinks=collector.failing_sinks,
        stalled_sinks={
            runner.name: round(runner.stalled_for(), 1)
            for runner in collector.runners
            if runner.stalled_for() > STALL_SHOWN_AFTER_S
        },
        parked_by_sink={runner.name: runner.parked for runner in collector.runners},
        intake_held_s=round(intake.held_s, 3),
        retained_ignored=intake.retained_ignored,
        quarantined_spans=spool.quarantine.spans,
        quarantined_records_lost=spool.quarantine.records_lost,
        client_id=intake.client_id,
    )


# --- Storage: per store, the oldest data kept and the space used (cached) --------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _retention(days: float) -> float | None:
    return days if days > 0 else None


def _failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {STORAGE_TIMEOUT_S:g} s"
    if isinstance(exc, IotmeterError):
        return f"unavailable: {exc.message}"
    return f"failed: {type(exc).__name__}: {exc}"


async def _store_figures(
    name: str, usage: Callable[[], Awaitable[StoreUsage]], retention_days: float
) -> StoreUsageStats:
    """A store's own figures; null ones, with the error in `detail`, when it fails."""
    retention = _retention(retention_days)
    try:
        measured = await asyncio.wait_for(usage(), STORAGE_TIMEOUT_S)
    except Exception as exc:
        if isinstance(exc, IotmeterError | TimeoutError):
            logger.warning("stats: the %s store's usage: %s", name, _failure(exc))
        else:
            logger.exception("stats: the %s store's usage failed", name)
        return StoreUsageStats(
            oldest_at=None, bytes_used=None, retention_days=retention, detail=_failure(exc)
        )
    oldest = measured.oldest_us
    return StoreUsageStats(
        oldest_at=None if oldest is None else _EPOCH + timedelta(microseconds=oldest),
        bytes_used=measured.bytes_used,
        retention_days=retention,
        detail=measured.detail,
    )


async def _table_size(session: AsyncSession, table: str) -> tuple[int | None, str | None]:
    """Bytes of a table and its indexes: PostgreSQL's `pg_total_relation_size`, SQLite's
    `dbstat` (when compiled in)."""
    if session.get_bind().dialect.name == "postgresql":
        size = await session.scalar(
            text("SELECT pg_total_relation_size(CAST(:table AS regclass))"), {"table": table}
        )
        return (None if size is None else int(size)), "table and indexes"
    try:
        async with session.begin_nested():
            size = await session.scalar(
                text(
                    "SELECT sum(pgsize) FROM dbstat WHERE name IN "
                    "(SELECT name FROM sqlite_master WHERE tbl_name = :table)"
                ),
                {"table": table},
            )
    except (OperationalError, DBAPIError):
        return None, "SQLite without dbstat: one table's size is not known"
    return int(size or 0), "table and indexes"


async def _table_figures(
    state: AppState,
    table: str,
    oldest_column: InstrumentedAttribute[datetime],
    retention_days: float,
    note: str,
) -> StoreUsageStats:
    """Rows, the oldest `oldest_column` and the size of one table of the database."""
    retention = _retention(retention_days)
    try:
        async with state.database.transaction() as session:
            row = (await session.execute(select(func.count(), func.min(oldest_column)))).one()
            size, how = await _table_size(session, table)
    except Exception as exc:
        logger.warning("stats: the %s figures: %s", table, exc)
        return StoreUsageStats(
            oldest_at=None, bytes_used=None, retention_days=retention, detail=_failure(exc)
        )
    count, oldest = row
    return StoreUsageStats(
        oldest_at=oldest,
        bytes_used=size,
        retention_days=retention,
        records=int(count),
        detail=f"{how}; {note}" if how else note,
    )


async def measure_storage(state: AppState) -> StorageStats:
    """Every store's figures, measured concurrently; a store that fails gives null figures."""
    settings = state.settings
    timeseries, archive, dead_letters, alerts = await asyncio.gather(
        _store_figures("time-series", state.timeseries.usage, settings.telemetry_retention_days),
        _store_figures("archive", state.archive.usage, settings.archive_retention_days),
        _table_figures(
            state,
            DeadLetter.__tablename__,
            DeadLetter.received_at,
            settings.dead_letter_retention_days,
            f"also at most {settings.dead_letter_max_rows} kept "
            f"({env_name('dead_letter_max_rows')})",
        ),
        _table_figures(
            state,
            DeviceAlert.__tablename__,
            DeviceAlert.created_at,
            settings.resolved_alert_retention_days,
            "the retention applies to resolved alerts (from their resolution); active and "
            "acknowledged ones are kept",
        ),
    )
    return StorageStats(
        measured_at=utcnow(),
        timeseries=timeseries,
        archive=archive,
        dead_letters=dead_letters,
        alerts=alerts,
    )


@dataclasses.dataclass
class _StorageCache:
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    figures: StorageStats | None = None
    measured_at: float = 0.0
    """`time.monotonic()` of the measurement."""


_storage_caches: dict[int, _StorageCache] = {}
"""Per app state (by id; an entry leaves with its state): tests run several apps at once."""


async def storage_stats(state: AppState) -> StorageStats:
    """The storage figures, measured at most once per `STORAGE_CACHE_S` per app: concurrent
    requests wait for one measurement rather than starting their own."""
    cache = _storage_caches.get(id(state))
    if cache is None:
        cache = _storage_caches[id(state)] = _StorageCache()
        weakref.finalize(state, _storage_caches.pop, id(state), None)
    async with cache.lock:
        if cache.figures is None or time.monotonic() - cache.measured_at >= STORAGE_CACHE_S:
            cache.figures = await measure_storage(state)
            cache.measured_at = time.monotonic()
        return cache.figures


class DeviceCounts(BaseModel):
    received: int = Field(description="MQTT messages on the device's topic since start.")
    stored: int = Field(description="Reading sets in both the time-series store and archive.")
    rejected: int


class DeviceCountsPage(BaseModel):
    devices: dict[str, DeviceCounts]
    total: int
    limit: int
    offset: int


@router.get("/stats/devices", summary="Per-device counts since start")
async def device_stats(
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    device_id: Annotated[str | None, Query(max_length=64)] = None,
) -> DeviceCountsPage:
    """Messages received vs reading sets stored, per device, ordered by device id."""
    counters = state.stats
    names = sorted(
        set(counters.received_by_device)
        | set(counters.rejected_by_device)
        | {name for counter in counters.stored_by_sink.values() for name in counter}
    )
    if device_id is not None:
        names = [name for name in names if name == device_id]
    page = names[offset : offset + limit]
    return DeviceCountsPage(
        devices={
            name: DeviceCounts(
                received=counters.received_by_device[name],
                stored=counters.stored_by_device(name),
                rejected=counters.rejected_by_device[name],
            )
            for name in page
        },
        total=len(names),
        limit=limit,
        offset=offset,
    )


async def _alerting_stats(state: AppState, session: AsyncSession) -> AlertingStats:
    rules = await session.scalar(
        select(func.count()).select_from(AlertRule).where(AlertRule.enabled.is_(True))
    )
    rows = await session.execute(
        select(Notification.status, func.count()).group_by(Notification.status)
    )
    sink = state.alert_sink
    return AlertingStats(
        rules_enabled=rules or 0,
        notifications_by_status={str(status): int(count) for status, count in rows},
        evaluated_events=sink.events if sink is not None else 0,
        late_readings_skipped=sink.late_skipped if sink is not None else 0,
    )


async def _channel_stats(state: AppState, session: AsyncSession) -> DeviceChannelStats:
    connected, out_of_sync = await ChannelRepository(session).channel_counts()
    channel = state.device_channel.stats if state.device_channel is not None else None
    accounts = state.broker_accounts
    return DeviceChannelStats(
        device_auth=state.device_auth,
        connected=connected,
        config_out_of_sync=out_of_sync,
        configs_published=channel.published if channel else 0,
        status_changes=channel.status_changes if channel else 0,
        reports=channel.reports if channel else 0,
        refused=channel.refused if channel else 0,
        broker_accounts=dataclasses.asdict(accounts.status) if accounts is not None else None,
    )


@router.get("/stats", summary="System statistics")
async def stats(state: StateDep, session: SessionDep) -> Stats:
    """Devices, ingestion counters since start (messages = MQTT messages; readings = reading
    sets, a batch message holds several), active alerts, the backends in use and what each
    store keeps (measured at most every 30 s)."""
    devices = DeviceRepository(session)
    by_type = await devices.count_by_type()
    window = state.settings.online_window_s
    online = await devices.count_seen_since(utcnow() - timedelta(seconds=window))
    counters = state.stats
    settings = state.settings
    return Stats(
        started_at=counters.started_at,
        devices=DeviceStats(
            total=sum(by_type.values()), online=online, online_window_s=window, by_type=by_type
        ),
        messages=MessageStats(
            received=counters.messages_received,
            stored=counters.readings_stored,
            rejected=counters.rejected.total(),
            rejected_by_reason=dict(counters.rejected),
            ingest_rate_per_s=round(counters.rate_per_second(), 3),
            last_message_at=counters.last_message_at,
        ),
        limits=LimitStats(
            max_devices=settings.max_devices,
            devices_room=max(0, settings.max_devices - sum(by_type.values()))
            if settings.max_devices
            else None,
            max_fields_per_message=settings.max_fields_per_message,
            max_new_series_per_device_hour=settings.max_new_series_per_device_hour,
            refused={reason: counters.rejected[reason] for reason in LIMIT_REASONS},
        ),
        alerting=await _alerting_stats(state, session),
        device_channel=await _channel_stats(state, session),
        spool=_spool_stats(state),
        active_alerts_by_severity=await AlertRepository(session).count_active_by_severity(),
        backends={
            "database": state.database.dialect,
            "timeseries": state.timeseries.backend,
            "archive": state.archive.backend,
            "mqtt": state.broker.describe() if state.broker else "off",
        },
        storage=await storage_stats(state),
    )
