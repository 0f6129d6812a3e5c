"""Rollups on both SQL backends: a query answered from rollups equals the same query over the
raw points, over random data and windows; late readings, replays and the lag behind now."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from iotmeter.db.engine import Database, build_engine
from iotmeter.readings import ReadingSet
from iotmeter.storage.timeseries.base import AGGREGATES, SeriesPoint, SeriesQuery
from iotmeter.storage.timeseries.rollups import HOUR_US, MINUTE_US, SETTLE_US
from iotmeter.storage.timeseries.sql import Lifecycle, SqlTimeSeriesStore
from tests.conftest import empty_tables
from tests.fixtures.readings import FakeClock, reading

SECOND_US = 1_000_000
# 2026-03-01T00:00:00Z: a whole day, so hours and days are aligned.
T0 = 1_772_323_200 * SECOND_US
EVERY = (
    MINUTE_US,
    2 * MINUTE_US,
    5 * MINUTE_US,
    7 * MINUTE_US,
    15 * MINUTE_US,
    HOUR_US,
    2 * HOUR_US,
    24 * HOUR_US,
)


@dataclass
class Stores:
    rolled: SqlTimeSeriesStore
    raw: SqlTimeSeriesStore
    clock: FakeClock


@pytest.fixture(params=["postgresql", "sqlite"])
async def stores(
    request: pytest.FixtureRequest, pg_url: str, sqlite_url: str
) -> AsyncIterator[Stores]:
    url = pg_url if request.param == "postgresql" else sqlite_url
    await empty_tables(url)
    database = Database(build_engine(url))
    clock = FakeClock(T0 - 10 * MINUTE_US)
    try:
        rolled = SqlTimeSeriesStore(database, clock=clock)
        raw = SqlTimeSeriesStore(database, lifecycle=Lifecycle(rollups=False), clock=clock)
        await rolled.prepare()
        yield Stores(rolled, raw, clock)
    finally:
        await database.close()


def random_readings(rng: random.Random, devices: list[str], span_us: int) -> list[ReadingSet]:
    """Irregular times (bursts, gaps, several in one second), values of every sign and size."""
    readings = []
    for device in devices:
        epoch_us = T0 + rng.randrange(0, 5 * MINUTE_US)
        while epoch_us < T0 + span_us:
            values = {
                name: rng.choice(
                    [rng.uniform(-1e6, 1e6), rng.gauss(20, 5), float(rng.randint(-3, 3))]
                )
                for name in rng.sample(
                    ["temperature", "humidity", "power", "voltage"], rng.randint(1, 4)
                )
            }
            readings.append(reading(device, epoch_us, values))
            epoch_us += rng.choice([1, 7, 10, 10, 10, 45, 130, 900]) * SECOND_US + rng.randrange(
                1000
            )
    return readings


def close(left: list[SeriesPoint], right: list[SeriesPoint]) -> bool:
    """Equal points; sums added in another order may differ in a float's last bits."""
    if [(p.field, p.epoch_us) for p in left] != [(p.field, p.epoch_us) for p in right]:
        return False
    return all(
        math.isclose(a.value, b.value, rel_tol=1e-9, abs_tol=1e-6)
        for a, b in zip(left, right, strict=True)
    )


async def settle(stores: Stores, until_us: int) -> None:
    """Move the clock and run the lifecycle until the rollups caught up with it."""
    stores.clock.now_us = until_us
    for _ in range(200):
        await stores.rolled.maintain(budget_s=30)
        if not await stores.rolled.rollups_pending():
            return
    raise AssertionError("the rollups did not catch up")


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("mode", ["live", "late"])
async def test_rollup_answers_equal_raw_answers(stores: Stores, seed: int, mode: str) -> None:
    """Property: random readings and random queries with `every` a whole number of minutes
    give the same points from rollups as from the raw points ("live": written as they
    happen, rolled up as windows close; "late": all written afterwards, so every minute is
    marked and recomputed)."""
    rng = random.Random(seed)
    span_us = rng.choice([40 * MINUTE_US, 3 * HOUR_US, 26 * HOUR_US])
    devices = [f"roll-{seed}-{n}" for n in range(2)]
    readings = random_readings(rng, devices, span_us)
    if mode == "late":
        stores.clock.now_us = T0 + span_us + HOUR_US
        for offset in range(0, len(readings), 2000):
            await stores.rolled.write(readings[offset : offset + 2000])
    else:
        readings.sort(key=lambda item: item.epoch_us)
        batch: list[ReadingSet] = []
        for item in readings:
            if batch and item.epoch_us - batch[0].epoch_us > 5 * MINUTE_US:
                stores.clock.now_us = batch[-1].epoch_us + SECOND_US
                await stores.rolled.write(batch)
                await stores.rolled.maintain(budget_s=30)
                batch = []
            batch.append(item)
        stores.clock.now_us = batch[-1].epoch_us + SECOND_US
        await stores.rolled.write(batch)
    await settle(stores, T0 + span_us + SETTLE_US + 2 * MINUTE_US)
    await compare_random_queries(stores, rng, devices, span_us)


async def compare_random_queries(
    stores: Stores, rng: random.Random, devices: list[str], span_us: int
) -> None:
    used_before = stores.rolled.rollup_queries
    for _ in range(25):
        every = rng.choice(EVERY)
        start = T0 + rng.randrange(-HOUR_US, span_us)
        stop = start + rng.randrange(MINUTE_US, span_us + HOUR_US)
        if rng.random() < 0.3:
            start = start // every * every
        fields = rng.choice([None, ["temperature"], ["power", "voltage"]])
        for aggregate in AGGREGATES:
            query = SeriesQuery(
                rng.choice(devices), start, stop, fields=fields, every_us=every, aggregate=aggregate
            )
            expected = await stores.raw.query(query)
            got = await stores.rolled.query(query)
            assert close(got, expected), (query, got[:5], expected[:5])
    # The rollups answered (most of) them: the comparison is not raw against raw.
    assert stores.rolled.rollup_queries - used_before > 25 * len(AGGREGATES) // 2


async def test_a_late_reading_recomputes_its_window(stores: Stores) -> None:
    device = "roll-late"
    readings = [reading(device, T0 + n * 10 * SECOND_US, {"v": float(n)}) for n in range(360)]
    stores.clock.now_us = T0
    await stores.rolled.write(readings)
    await settle(stores, T0 + HOUR_US + 5 * MINUTE_US)
    query = SeriesQuery(device, T0, T0 + HOUR_US, every_us=HOUR_US, aggregate="max")
    assert await stores.rolled.query(query) == [SeriesPoint("v", T0, 359.0)]

    # A reading arrives an hour late, inside a rolled-up minute, with the highest value yet;
    # and a replay changes the value of an existing point.
    stores.clock.now_us = T0 + 2 * HOUR_US
    await stores.rolled.write([reading(device, T0 + 15 * MINUTE_US + 5 * SECOND_US, {"v": 1000.0})])
    await stores.rolled.write([reading(device, T0, {"v": -5.0})])
    # Right at once: the marked minutes are read from the points until recomputed.
    assert await stores.rolled.rollups_pending()
    for aggregate in AGGREGATES:
        for every in (MINUTE_US, HOUR_US):
            query = SeriesQuery(device, T0, T0 + HOUR_US, every_us=every, aggregate=aggregate)
            assert close(await stores.rolled.query(query), await stores.raw.query(query))
    await settle(stores, T0 + 2 * HOUR_US)
    for aggregate in AGGREGATES:
        for every in (MINUTE_US, 5 * MINUTE_US, HOUR_US):
            query = SeriesQuery(device, T0, T0 + HOUR_US, every_us=every, aggregate=aggregate)
            assert close(await stores.rolled.query(query), await stores.raw.query(query))
    hourly = await stores.rolled.query(
        SeriesQuery(device, T0, T0 + HOUR_US, every_us=HOUR_US, aggregate="count")
    )
    assert hourly == [SeriesPoint("v", T0, 361.0)]
    first = await stores.rolled.query(
        SeriesQuery(device, T0, T0 + HOUR_US, every_us=HOUR_US, aggregate="first")
    )
    assert first == [SeriesPoint("v", T0, -5.0)]


async def test_a_replay_over_a_rolled_up_range_changes_nothing(stores: Stores) -> None:
    device = "roll-replay"
    readings = [
        reading(device, T0 + n * 10 * SECOND_US, {"a": n * 1.5, "b": -n}) for n in range(720)
    ]
    stores.clock.now_us = T0
    await stores.rolled.write(readings)
    await settle(stores, T0 + 2 * HOUR_US + 5 * MINUTE_US)
    query = SeriesQuery(device, T0, T0 + 2 * HOUR_US, every_us=MINUTE_US, aggregate="mean")
    before = await stores.rolled.query(query)
    stores.clock.now_us = T0 + 3 * HOUR_US
    await stores.rolled.write(readings)  # the whole range again: every minute marked
    assert await stores.rolled.rollups_pending()
    await settle(stores, T0 + 3 * HOUR_US)
    assert await stores.rolled.query(query) == before
    assert close(before, await stores.raw.query(query))


async def test_rollups_stay_at_most_two_minutes_behind(stores: Stores) -> None:
    device = "roll-lag"
    stores.clock.now_us = T0
    for second in range(0, 1800, 10):
        stores.clock.now_us = T0 + second * SECOND_US
        await stores.rolled.write([reading(device, stores.clock.now_us, {"v": float(second)})])
        if second % 10 == 0:  # the lifecycle task's 10-second interval
            await stores.rolled.maintain(budget_s=30)
            coverage = await stores.rolled.rollup_coverage()
            assert stores.clock.now_us - coverage["1m"].until_us <= 2 * MINUTE_US


@pytest.mark.parametrize("seed", range(4))
async def test_rollups_begun_mid_hour_over_older_data(stores: Stores, seed: int) -> None:
    """An existing store gets rollups in the middle of an hour: the readings from before are
    backfilled, the hour the rollups began in is completed once its minutes are, and the
    readings after arrive live."""
    rng = random.Random(100 + seed)
    devices = [f"mid-{seed}-{n}" for n in range(2)]
    span_us = 3 * HOUR_US
    readings = sorted(random_readings(rng, devices, span_us), key=lambda item: item.epoch_us)
    begin = T0 + HOUR_US + rng.randrange(1, 59) * MINUTE_US
    older = [item for item in readings if item.epoch_us < begin - SETTLE_US]
    newer = [item for item in readings if item.epoch_us >= begin - SETTLE_US]
    # Written before the rollups existed: a fresh database's state, then a store without them.
    await empty_tables(stores.rolled.database.engine.url.render_as_string(hide_password=False))
    stores.clock.now_us = begin
    await stores.raw.write(older)
    await stores.rolled.prepare()
    for item in newer:
        stores.clock.now_us = max(stores.clock.now_us, item.epoch_us + SECOND_US)
        await stores.rolled.write([item])
        if rng.random() < 0.05:
            await stores.rolled.maintain(budget_s=30)
    await settle(stores, T0 + span_us + SETTLE_US + 2 * MINUTE_US)
    await compare_random_queries(stores, rng, devices, span_us)


async def test_rollups_turned_off_and_on_again_start_afresh(stores: Stores) -> None:
    """Readings written while the rollups are off mark nothing; turned on again, the rollups
    must not claim those windows complete."""
    device = "roll-off"
    stores.clock.now_us = T0 + HOUR_US
    await stores.rolled.write([reading(device, T0 + n * MINUTE_US, {"v": 1.0}) for n in range(60)])
    await settle(stores, T0 + 2 * HOUR_US)
    off = SqlTimeSeriesStore(
        stores.rolled.database, lifecycle=Lifecycle(rollups=False), clock=stores.clock
    )
    await off.prepare()
    await off.write(
        [reading(device, T0 + n * MINUTE_US + SECOND_US, {"v": 2.0}) for n in range(60)]
    )
    on = SqlTimeSeriesStore(stores.rolled.database, clock=stores.clock)
    await on.prepare()
    stores.rolled = on
    # Once the hour the rollups began in is complete, the hourly coverage reaches back.
    await settle(stores, T0 + 3 * HOUR_US + 2 * MINUTE_US)
    query = SeriesQuery(device, T0, T0 + HOUR_US, every_us=HOUR_US, aggregate="sum")
    assert await on.query(query) == [SeriesPoint("v", T0, 180.0)]
    assert on.rollup_queries == 1
