"""Retention of the SQL time series with a fake clock: PostgreSQL drops whole daily
partitions (also while ingest runs, losing nothing inside the window), SQLite deletes in
bounded chunks; readings older than the retention are not written at all."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text

from iotmeter.db.engine import Database, build_engine
from iotmeter.readings import ReadingSet
from iotmeter.storage.timeseries import partitions, sql
from iotmeter.storage.timeseries.base import SeriesQuery
from iotmeter.storage.timeseries.sql import Lifecycle, SqlTimeSeriesStore
from tests.fixtures.readings import PARTITIONED_DAY_US, FakeClock
from tests.fixtures.readings import reading as fixture_reading

DAY_US = partitions.DAY_US
HOUR_US = 3_600_000_000
# Days after the migration's history partition (which ends tomorrow): daily partitions.
BASE_US = PARTITIONED_DAY_US


@pytest.fixture
async def pg_database(own_pg_database: Database) -> Database:
    return own_pg_database


def reading(device_id: str, epoch_us: int, value: float = 1.0) -> ReadingSet:
    return fixture_reading(device_id, epoch_us, {"v": value})


async def count(database: Database, where: str = "true") -> int:
    async with database.autocommit_engine.connect() as connection:
        return int(
            (
                await connection.execute(text(f"SELECT count(*) FROM telemetry WHERE {where}"))
            ).scalar_one()
        )


async def partition_names(database: Database, table: str = "telemetry") -> list[str]:
    async with database.autocommit_engine.connect() as connection:
        raw = await connection.get_raw_connection()
        return [part.name for part in await partitions.partitions(raw.driver_connection, table)]


async def test_postgresql_drops_whole_expired_days(pg_database: Database) -> None:
    clock = FakeClock(BASE_US + 5 * DAY_US + 12 * HOUR_US)
    store = SqlTimeSeriesStore(
        pg_database, lifecycle=Lifecycle(retention_us=2 * DAY_US, compaction=False), clock=clock
    )
    await store.prepare()
    cutoff = clock.now_us - 2 * DAY_US
    # Unaffected by the retention (written before it applies): six days of hourly readings,
    # and a reading from before partitioning, in the history partition.
    loader = SqlTimeSeriesStore(pg_database, lifecycle=Lifecycle(rollups=False), clock=clock)
    await loader.write(
        [reading("ret", BASE_US + hour * HOUR_US) for hour in range(6 * 24)]
        + [reading("ret-old", time.time_ns() // 1000 - DAY_US)]
    )
    # The raw points are partitioned by hour.
    days = [
        {partitions.day_name("telemetry", BASE_US + day * DAY_US + h * HOUR_US) for h in range(24)}
        for day in range(6)
    ]
    assert set.union(*days) <= set(await partition_names(pg_database))

    await store.maintain(budget_s=5)

    left = await partition_names(pg_database)
    # Days wholly older than the cutoff are gone; the day the cutoff falls in stays whole.
    assert not set.union(*days[:3]) & set(left)
    # The hour the cutoff falls in stays whole, and every later one.
    assert {
        name
        for name in set.union(*days[3:])
        if name >= partitions.day_name("telemetry", cutoff - cutoff % HOUR_US)
    } <= set(left)
    assert await count(pg_database, f"epoch_us < {cutoff - cutoff % HOUR_US}") == 0
    assert await count(pg_database, f"epoch_us >= {cutoff - cutoff % HOUR_US}") == 2 * 24 + 12
    assert await count(pg_database, "device_id = 'ret-old'") == 0
    # Partitions for the coming days were made ahead.
    assert partitions.day_name("telemetry", clock.now_us + 3 * DAY_US - HOUR_US) in left
    # A reading older than the retention is not written (its day's partition is gone).
    await store.write([reading("ret", cutoff - HOUR_US), reading("ret", cutoff + HOUR_US)])
    assert store.expired_skipped == 1
    assert await count(pg_database, f"epoch_us = {cutoff + HOUR_US}") == 1
    # The query API no longer sees the expired days.
    points = await store.query(SeriesQuery("ret", BASE_US, clock.now_us))
    assert min(point.epoch_us for point in points) >= cutoff - cutoff % HOUR_US


async def test_a_partition_dropped_while_ingest_runs_loses_nothing_inside_the_window(
    pg_database: Database,
) -> None:
    clock = FakeClock(BASE_US + 30 * DAY_US)
    loader = SqlTimeSeriesStore(pg_database, lifecycle=Lifecycle(rollups=False), clock=clock)
    # Twenty expired days with data, to be dropped one after another.
    await loader.write([reading("old", BASE_US + day * DAY_US + HOUR_US) for day in range(20)])
    store = SqlTimeSeriesStore(
        pg_database, lifecycle=Lifecycle(retention_us=5 * DAY_US, compaction=False), clock=clock
    )
    await store.prepare()
    written: set[tuple[str, int]] = set()
    stop = asyncio.Event()

    async def ingest() -> None:
        step = 0
        while not stop.is_set():
            # Readings over the last four days (inside the window), several days per batch.
            batch = [
                reading(f"live-{n % 7}", clock.now_us - (step * 97 + n * 3_600_017) % (4 * DAY_US))
                for n in range(500)
            ]
            await store.write(batch)
            written.update((r.device_id, r.epoch_us) for r in batch)
            step += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ingest())
    old_days = {
        partitions.day_name("telemetry", BASE_US + day * DAY_US + HOUR_US) for day in range(20)
    }
    try:
        for _ in range(10):  # a drop that lost a lock conflict to the writer waits a round
            await store.maintain(budget_s=2)
            await asyncio.sleep(0.05)
            if not old_days & set(await partition_names(pg_database)):
                break
    finally:
        stop.set()
        await task
    left = await partition_names(pg_database)
    assert not any(
        partitions.day_name("telemetry", BASE_US + day * DAY_US) in left for day in range(20)
    )
    assert await count(pg_database, "device_id = 'old'") == 0
    # Every reading inside the window is there (distinct keys: a repeated key overwrites).
    async with pg_database.autocommit_engine.connect() as connection:
        stored = (
            await connection.execute(
                text("SELECT count(*) FROM telemetry WHERE device_id LIKE 'live-%'")
            )
        ).scalar_one()
    assert len(written) > 5000
    assert stored == len(written)
    assert store.expired_skipped == 0


async def test_sqlite_deletes_in_bounded_chunks(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import empty_tables

    await empty_tables(sqlite_url)
    database = Database(build_engine(sqlite_url))
    try:
        clock = FakeClock(BASE_US)
        loader = SqlTimeSeriesStore(database, lifecycle=Lifecycle(rollups=False), clock=clock)
        await loader.write([reading("sq", BASE_US - 10 * DAY_US + n * 1000) for n in range(2500)])
        await loader.write([reading("sq", BASE_US - DAY_US + n * 1000) for n in range(100)])
        monkeypatch.setattr(sql, "SQLITE_DELETE_CHUNK", 100)
        store = SqlTimeSeriesStore(
            database, lifecycle=Lifecycle(retention_us=7 * DAY_US, rollups=False), clock=clock
        )
        # One round deletes at most 20 chunks: ingest gets the database between them.
        assert await store.maintain(budget_s=1) == 2000
        assert await count(database) == 600
        assert await store.maintain(budget_s=1) == 500
        assert await count(database) == 100
        assert await store.maintain(budget_s=1) == 0
    finally:
        await database.close()


async def test_compacted_days_expire_whole_too(pg_database: Database) -> None:
    clock = FakeClock(BASE_US + 4 * DAY_US)
    store = SqlTimeSeriesStore(pg_database, lifecycle=Lifecycle(rollups=False), clock=clock)
    await store.prepare()
    await store.write([reading("cret", BASE_US + hour * HOUR_US) for hour in range(4 * 24)])
    await store.maintain(budget_s=60)  # compacts every closed hour
    compacted = "SELECT count(*) FROM telemetry_compact"
    async with pg_database.autocommit_engine.connect() as connection:
        assert (await connection.execute(text(compacted))).scalar_one() == 4 * 24 - 1
    expiring = SqlTimeSeriesStore(
        pg_database, lifecycle=Lifecycle(retention_us=2 * DAY_US, rollups=False), clock=clock
    )
    await expiring.maintain(budget_s=60)
    left = await partition_names(pg_database, "telemetry_compact")
    assert partitions.day_name("telemetry_compact", BASE_US) not in left
    assert partitions.day_name("telemetry_compact", BASE_US + DAY_US) not in left
    points = await expiring.query(SeriesQuery("cret", BASE_US, clock.now_us))
    assert [point.epoch_us for point in points] == [
        BASE_US + hour * HOUR_US for hour in range(2 * 24, 4 * 24)
    ]
