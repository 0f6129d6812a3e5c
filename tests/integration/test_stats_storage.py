"""`GET /api/v1/stats` → `storage`: per store the oldest data kept, the space used, the retention.

On PostgreSQL and SQLite with the SQL time-series store and the local archive; with the fake
InfluxDB (stopped, slow, counted) for a store that is down, too slow, and for the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from iotmeter.api.routes import stats as stats_module
from iotmeter.app import create_app
from iotmeter.db.engine import Database, build_engine
from iotmeter.db.models import Device, DeviceAlert
from iotmeter.readings import Rejection, RejectReason
from iotmeter.repositories.dead_letters import DeadLetterRepository
from iotmeter.storage.timeseries.influx import InfluxTimeSeriesStore
from iotmeter.storage.timeseries.sql import SqlTimeSeriesStore
from tests.conftest import auth_headers, make_settings
from tests.fixtures.fake_influx import FakeInflux
from tests.fixtures.readings import MINUTE_US, SECOND_US, reading

STATS = "/api/v1/stats"
BASE_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def at(epoch_us: int) -> datetime:
    return EPOCH + timedelta(microseconds=epoch_us)


def parsed(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00"))


async def fill_database(database_url: str) -> None:
    """Readings from BASE_US + 5 s on, one dead letter received at BASE_US, two alerts."""
    database = Database(build_engine(database_url))
    try:
        await SqlTimeSeriesStore(database).write(
            [
                reading("m-1", BASE_US + MINUTE_US, {"kwh": 1.0, "on": True}),
                reading("m-2", BASE_US + 5 * SECOND_US, {"kwh": 2.0}),
                reading("m-1", BASE_US + 2 * MINUTE_US, {"kwh": 3.0}),
            ]
        )
        async with database.transaction() as session:
            await DeadLetterRepository(session).add_many(
                [
                    Rejection(
                        reason=RejectReason.NOT_JSON,
                        detail="the payload is not JSON",
                        topic="iot/m-1/telemetry",
                        payload=b"not json",
                        device_id="m-1",
                        received_at_us=BASE_US,
                    )
                ]
            )
            session.add(Device(id="m-1", name="Meter", type="power"))
            await session.flush()
            session.add_all(
                [
                    DeviceAlert(
                        device_id="m-1",
                        severity="warning",
                        status=status,
                        message=status,
                        created_at=at(BASE_US + offset_us),
                    )
                    for status, offset_us in (("active", 3 * MINUTE_US), ("resolved", MINUTE_US))
                ]
            )
    finally:
        await database.close()


async def test_storage_figures_of_every_store(api: httpx.AsyncClient, database_url: str) -> None:
    await fill_database(database_url)

    response = await api.get(STATS)

    assert response.status_code == 200, response.text
    storage = response.json()["storage"]
    timeseries = storage["timeseries"]
    assert parsed(timeseries["oldest_at"]) == at(BASE_US + 5 * SECOND_US)
    assert timeseries["bytes_used"] > 0
    assert timeseries["retention_days"] is None  # the default: kept forever
    assert timeseries["records"] is None

    archive = storage["archive"]  # nothing archived: the collector does not run here
    assert archive["oldest_at"] is None
    assert archive["retention_days"] is None
    assert not archive["detail"].startswith(("unavailable", "failed", "no answer"))

    dead_letters = storage["dead_letters"]
    assert parsed(dead_letters["oldest_at"]) == at(BASE_US)
    assert dead_letters["records"] == 1
    assert dead_letters["bytes_used"] > 0  # pg_total_relation_size; SQLite's dbstat
    assert dead_letters["retention_days"] == 30
    assert "100000" in dead_letters["detail"]

    alerts = storage["alerts"]
    assert parsed(alerts["oldest_at"]) == at(BASE_US + MINUTE_US)
    assert alerts["records"] == 2
    assert alerts["bytes_used"] > 0
    assert alerts["retention_days"] == 90
    assert "resolved" in alerts["detail"]
    assert parsed(storage["measured_at"]) is not None


async def test_an_empty_database(api: httpx.AsyncClient) -> None:
    storage = (await api.get(STATS)).json()["storage"]
    for name in ("timeseries", "dead_letters", "alerts"):
        assert storage[name]["oldest_at"] is None, name
    assert storage["dead_letters"]["records"] == storage["alerts"]["records"] == 0


# --- InfluxDB as the time-series store: down, slow, and the cache -----------------------------


@contextlib.asynccontextmanager
async def influx_app(
    database_url: str, tmp_path: Path, fake: FakeInflux, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        database_url,
        tmp_path,
        influx_url=fake.url,
        influx_token=fake.token,
        influx_org=fake.org,
        influx_bucket=fake.bucket,
        **overrides,
    )
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        headers = await auth_headers(settings)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://iotmeter", headers=headers
        ) as client:
            yield client


def oldest_queries(fake: FakeInflux) -> int:
    return sum('min(column: "_time")' in query for query in fake.queries)


async def test_a_store_that_is_down_gives_null_figures_and_the_stats_still_answer(
    database_url: str, tmp_path: Path
) -> None:
    fake = FakeInflux(bucket_retention_s=7 * 86_400)
    async with fake, influx_app(database_url, tmp_path, fake, telemetry_retention_days=7) as api:
        await fake.stop()
        response = await api.get(STATS)
    assert response.status_code == 200, response.text
    storage = response.json()["storage"]
    timeseries = storage["timeseries"]
    assert timeseries["oldest_at"] is None
    assert timeseries["bytes_used"] is None
    assert timeseries["retention_days"] == 7
    assert timeseries["detail"].startswith("unavailable: InfluxDB at ")
    assert "query failed" in timeseries["detail"]
    assert storage["dead_letters"]["records"] == 0  # the other stores still answer


async def test_a_store_that_does_not_answer_in_time_gives_null_figures(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stats_module, "STORAGE_TIMEOUT_S", 0.3)
    async with FakeInflux() as fake, influx_app(database_url, tmp_path, fake) as api:
        fake.delay_next("query", 5.0)
        response = await api.get(STATS)
    assert response.status_code == 200, response.text
    assert response.json()["storage"]["timeseries"]["detail"] == "no answer within 0.3 s"


async def test_figures_are_measured_once_per_30_s_however_often_they_are_asked(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeInflux() as fake, influx_app(database_url, tmp_path, fake) as api:
        now_us = BASE_US + 3 * MINUTE_US
        fake_points = [reading("m-1", now_us, {"kwh": 1.0})]
        assert not fake.point_count()
        first = (await api.get(STATS)).json()["storage"]
        assert first["timeseries"]["oldest_at"] is None
        assert first["timeseries"]["bytes_used"] is None
        assert "does not report a bucket's size" in first["timeseries"]["detail"]
        for _ in range(5):
            again = (await api.get(STATS)).json()["storage"]
            assert again == first
        assert oldest_queries(fake) == 1

        # Past the cache's lifetime, the figures are measured again.
        store = InfluxTimeSeriesStore(fake.url, fake.token, fake.org, fake.bucket)
        try:
            await store.write(fake_points)
        finally:
            await store.aclose()
        monkeypatch.setattr(stats_module, "STORAGE_CACHE_S", 0.0)
        fresh = (await api.get(STATS)).json()["storage"]
        assert oldest_queries(fake) == 2
        assert parsed(fresh["timeseries"]["oldest_at"]) == at(now_us)
        assert fresh["measured_at"] != first["measured_at"]
