"""Compaction on PostgreSQL: closed hours become arrays and every query answers as before;
late and redelivered readings for a compacted hour; ingest during compaction loses nothing;
a second round changes nothing."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from sqlalchemy import text

from iotmeter.db.engine import Database
from iotmeter.storage.timeseries import partitions
from iotmeter.storage.timeseries.base import AGGREGATES, SeriesPoint, SeriesQuery
from iotmeter.storage.timeseries.sql import Lifecycle, SqlTimeSeriesStore
from tests.fixtures.readings import PARTITIONED_DAY_US, FakeClock, reading

SECOND_US = 1_000_000
MINUTE_US = 60 * SECOND_US
HOUR_US = partitions.HOUR_US
DAY_US = partitions.DAY_US
# After the migration's history partition (which ends tomorrow): hourly partitions.
BASE_US = PARTITIONED_DAY_US


@pytest.fixture
async def database(own_pg_database: Database) -> Database:
    return own_pg_database


async def rows(database: Database, sql: str) -> int:
    async with database.autocommit_engine.connect() as connection:
        return int((await connection.execute(text(sql))).scalar_one())


def close(left: list[SeriesPoint], right: list[SeriesPoint]) -> bool:
    if [(p.field, p.epoch_us) for p in left] != [(p.field, p.epoch_us) for p in right]:
        return False
    return all(
        math.isclose(a.value, b.value, rel_tol=1e-9, abs_tol=1e-6)
        for a, b in zip(left, right, strict=True)
    )


async def answers(store: SqlTimeSeriesStore, queries: list[SeriesQuery]) -> list[list[SeriesPoint]]:
    return [await store.query(query) for query in queries]


def random_queries(rng: random.Random, devices: list[str], span_us: int) -> list[SeriesQuery]:
    queries = []
    for _ in range(40):
        start = BASE_US + rng.randrange(-HOUR_US, span_us)
        stop = start + rng.randrange(SECOND_US, span_us)
        every = rng.choice([None, None, 10 * SECOND_US, 90 * SECOND_US, MINUTE_US, HOUR_US])
        queries.append(
            SeriesQuery(
                rng.choice(devices),
                start,
                stop,
                fields=rng.choice([None, ["a"], ["b", "c"]]),
                every_us=every,
                aggregate=rng.choice(AGGREGATES),
            )
        )
    return queries


async def test_compacted_hours_answer_every_query_as_before(database: Database) -> None:
    rng = random.Random(7)
    clock = FakeClock(BASE_US)
    # The same database through a store that does not compact: the answers before.
    store = SqlTimeSeriesStore(database, lifecycle=Lifecycle(compaction=False), clock=clock)
    await store.prepare()
    devices = ["cmp-0", "cmp-1", "cmp-2"]
    span_us = 5 * HOUR_US
    readings = []
    for device in devices:
        epoch_us = BASE_US + rng.randrange(SECOND_US)
        while epoch_us < BASE_US + span_us:
            fields = rng.sample(["a", "b", "c"], rng.randint(1, 3))
            readings.append(reading(device, epoch_us, {f: rng.uniform(-50, 50) for f in fields}))
            epoch_us += rng.choice([1, 10, 10, 10, 60, 600]) * SECOND_US + rng.randrange(999)
    for offset in range(0, len(readings), 3000):
        clock.now_us = readings[offset].epoch_us
        await store.write(readings[offset : offset + 3000])
    queries = random_queries(rng, devices, span_us)
    clock.now_us = BASE_US + span_us + 10 * MINUTE_US
    while await store.rollups_pending():
        await store.maintain(budget_s=30)
    before = await answers(store, queries)
    scans_before = [
        await store.scan(device, "a", BASE_US, BASE_US + span_us, 100_000) for device in devices
    ]
    raw_rows = await rows(database, "SELECT count(*) FROM telemetry")
    assert raw_rows == sum(len(item.values) for item in readings)

    store = SqlTimeSeriesStore(database, clock=clock)
    await store.maintain(budget_s=60)  # compacts the five closed hours

    assert store.compacted_hours == 5
    assert await rows(database, "SELECT count(*) FROM telemetry") == 0
    compacted = await rows(
        database, "SELECT coalesce(sum(cardinality(point_values)), 0) FROM telemetry_compact"
    )
    assert compacted == raw_rows
    after = await answers(store, queries)
    for query, old, new in zip(queries, before, after, strict=True):
        assert close(new, old), query
    for device, old_scan in zip(devices, scans_before, strict=True):
        assert await store.scan(device, "a", BASE_US, BASE_US + span_us, 100_000) == old_scan
    # Export-style keyset reads across the hour boundaries give the same series.
    pieces: list[tuple[int, float]] = []
    cursor = BASE_US
    while True:
        chunk = await store.scan("cmp-0", "b", cursor, BASE_US + span_us, 97)
        if not chunk:
            break
        pieces.extend(chunk)
        cursor = chunk[-1][0] + 1
    assert pieces == await store.scan("cmp-0", "b", BASE_US, BASE_US + span_us, 100_000)

    # A second round: nothing to do, the emptied partitions are dropped, answers unchanged.
    hourly = [partitions.day_name("telemetry", BASE_US + hour * HOUR_US) for hour in range(5)]
    await store.maintain(budget_s=60)
    async with database.autocommit_engine.connect() as connection:
        raw = await connection.get_raw_connection()
        left = {
            part.name for part in await partitions.partitions(raw.driver_connection, "telemetry")
        }
    assert not set(hourly) & left
    assert await answers(store, queries) == after


async def test_late_and_redelivered_readings_for_a_compacted_hour(database: Database) -> None:
    clock = FakeClock(BASE_US)
    store = SqlTimeSeriesStore(database, clock=clock)
    await store.prepare()
    device = "cmp-late"
    await store.write(
        [reading(device, BASE_US + n * 10 * SECOND_US, {"v": float(n)}) for n in range(360)]
    )
    clock.now_us = BASE_US + 2 * HOUR_US
    while await store.rollups_pending():
        await store.maintain(budget_s=30)
    await store.maintain(budget_s=30)
    assert store.compacted_hours == 1
    hour = SeriesQuery(device, BASE_US, BASE_US + HOUR_US)

    # A redelivery with another value for a compacted point, and a new late point: both show
    # at once, each point once, the newer write winning.
    await store.write(
        [
            reading(device, BASE_US + 50 * SECOND_US, {"v": 1000.0}),
            reading(device, BASE_US + 55 * SECOND_US, {"v": -1.0}),
        ]
    )
    points = await store.query(hour)
    assert len(points) == 361
    assert SeriesPoint("v", BASE_US + 50 * SECOND_US, 1000.0) in points
    assert SeriesPoint("v", BASE_US + 55 * SECOND_US, -1.0) in points
    # Windows narrower than the rollups read the points: right at once.
    windows = await store.query(
        SeriesQuery(device, BASE_US, BASE_US + HOUR_US, every_us=30 * SECOND_US, aggregate="max")
    )
    assert windows[1] == SeriesPoint("v", BASE_US + 30 * SECOND_US, 1000.0)
    # The rollups recompute the marked minutes from both forms.
    while await store.rollups_pending():
        await store.maintain(budget_s=30)
    assert await store.query(
        SeriesQuery(device, BASE_US, BASE_US + HOUR_US, every_us=HOUR_US, aggregate="count")
    ) == [SeriesPoint("v", BASE_US, 361.0)]
    assert await store.query(
        SeriesQuery(device, BASE_US, BASE_US + HOUR_US, every_us=HOUR_US, aggregate="max")
    ) == [SeriesPoint("v", BASE_US, 1000.0)]

    # The next round merges the raw rows into the compacted row.
    await store.maintain(budget_s=30)
    assert await rows(database, f"SELECT count(*) FROM telemetry WHERE device_id = '{device}'") == 0
    assert await store.query(hour) == points


async def test_ingest_during_compaction_loses_nothing(database: Database) -> None:
    clock = FakeClock(BASE_US + 6 * HOUR_US)
    store = SqlTimeSeriesStore(database, lifecycle=Lifecycle(rollups=False), clock=clock)
    await store.prepare()
    # Six hours to compact.
    seeded = [
        reading(f"cmp-run-{n % 5}", BASE_US + n * 997_003, {"v": float(n)}) for n in range(6 * 3600)
    ]
    for offset in range(0, len(seeded), 5000):
        await store.write(seeded[offset : offset + 5000])
    written = {(item.device_id, item.epoch_us) for item in seeded}
    stop = asyncio.Event()
    rng = random.Random(3)

    async def ingest() -> None:
        while not stop.is_set():
            # Current readings and late ones (some into the hours being compacted).
            batch = [
                reading(
                    f"cmp-run-{rng.randrange(5)}",
                    BASE_US + rng.randrange(7 * HOUR_US),
                    {"v": rng.random()},
                )
                for _ in range(200)
            ]
            await store.write(batch)
            written.update((item.device_id, item.epoch_us) for item in batch)
            await asyncio.sleep(0)

    task = asyncio.create_task(ingest())
    try:
        for _ in range(4):
            await store.maintain(budget_s=10)
    finally:
        stop.set()
        await task
    assert store.compacted_hours >= 6
    for device in {key[0] for key in written}:
        points = await store.query(
            SeriesQuery(device, BASE_US, BASE_US + 7 * HOUR_US, limit=1_000_000)
        )
        assert sorted(point.epoch_us for point in points) == sorted(
            epoch_us for name, epoch_us in written if name == device
        )


async def test_an_hour_left_detached_by_a_crash_is_attached_again(database: Database) -> None:
    """A round cut off between `DETACH ... CONCURRENTLY` and `DROP` leaves the hour's table
    detached: invisible to readers, and its name taken for a late reading's new partition.
    The next start (or round) attaches it again, rows and all, and a late reading for that
    hour still lands."""
    clock = FakeClock(BASE_US + 30 * MINUTE_US)
    store = SqlTimeSeriesStore(
        database, lifecycle=Lifecycle(rollups=False, compaction=False), clock=clock
    )
    await store.write(
        [reading("cmp-crash", BASE_US + n * SECOND_US, {"v": 1.0}) for n in range(100)]
    )
    name = partitions.day_name("telemetry", BASE_US)
    async with database.autocommit_engine.connect() as connection:
        await connection.exec_driver_sql(f"ALTER TABLE telemetry DETACH PARTITION {name}")
    assert await store.query(SeriesQuery("cmp-crash", BASE_US, BASE_US + HOUR_US)) == []
    # A late reading for that hour before anything repaired it: written, not refused.
    await store.write([reading("cmp-crash", BASE_US + 200 * SECOND_US, {"v": 2.0})])
    points = await store.query(SeriesQuery("cmp-crash", BASE_US, BASE_US + HOUR_US))
    assert len(points) == 101
    await SqlTimeSeriesStore(database, clock=clock).prepare()
    assert len(await store.query(SeriesQuery("cmp-crash", BASE_US, BASE_US + HOUR_US))) == 101
