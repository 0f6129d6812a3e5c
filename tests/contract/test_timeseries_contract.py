"""One behaviour for every `TimeSeriesStore`: SQL (PostgreSQL, SQLite) and InfluxDB.

InfluxDB runs as the fake InfluxDB 2.x server (`tests/fixtures/fake_influx.py`), and also as a
real server when `IOTMETER_TEST_INFLUX_URL` and `IOTMETER_TEST_INFLUX_TOKEN` are set (optionally
`IOTMETER_TEST_INFLUX_ORG` / `IOTMETER_TEST_INFLUX_BUCKET`; the token must read, write and delete
in the bucket, whose retention must be infinite, as in compose.infra.yml: one test writes 1969).
Every test writes under its own device ids, so tests never see each other's data, and the live
server's points are deleted afterwards.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

from iotmeter.db.engine import Database, build_engine
from iotmeter.errors import ValidationFailed
from iotmeter.readings import ReadingSet
from iotmeter.storage.timeseries.base import (
    AGGREGATES,
    Aggregate,
    SeriesPoint,
    SeriesQuery,
    TimeSeriesStore,
)
from iotmeter.storage.timeseries.influx import InfluxTimeSeriesStore
from iotmeter.storage.timeseries.sql import SqlTimeSeriesStore
from tests.conftest import empty_tables
from tests.fixtures.fake_influx import FakeInflux
from tests.fixtures.readings import HOUR_US, MINUTE_US, SECOND_US, reading

LIVE_URL = os.environ.get("IOTMETER_TEST_INFLUX_URL", "")
LIVE_TOKEN = os.environ.get("IOTMETER_TEST_INFLUX_TOKEN", "")
LIVE_ORG = os.environ.get("IOTMETER_TEST_INFLUX_ORG", "iot-org")
LIVE_BUCKET = os.environ.get("IOTMETER_TEST_INFLUX_BUCKET", "iot-metrics")

# Without a configured server the live backend is not a skipped test: it does not exist.
BACKENDS = ["sql-postgresql", "sql-sqlite", "influx-fake"]
if LIVE_URL and LIVE_TOKEN:
    BACKENDS.append("influx-live")


async def delete_live_points(device_ids: list[str]) -> None:
    # The delete API takes `=` and AND only (no OR, no regex): one call per device.
    async with InfluxDBClientAsync(url=LIVE_URL, token=LIVE_TOKEN, org=LIVE_ORG) as client:
        for device_id in device_ids:
            await client.delete_api().delete(
                datetime(1900, 1, 1, tzinfo=UTC),
                datetime(2100, 1, 1, tzinfo=UTC),
                f'_measurement="iot_telemetry" AND device_id="{device_id}"',
                LIVE_BUCKET,
                LIVE_ORG,
            )


@pytest.fixture
def used_device_ids() -> list[str]:
    return []


@pytest.fixture
def new_device(used_device_ids: list[str]) -> Callable[[], str]:
    """`new_device()` names a device no other test (or run) writes to."""

    def name() -> str:
        used_device_ids.append(f"contract-{uuid.uuid4().hex}")
        return used_device_ids[-1]

    return name


@pytest.fixture
def base_us() -> int:
    """A whole minute an hour ago: inside any retention period and `latest`'s lookback."""
    return (time.time_ns() // 1000 - HOUR_US) // MINUTE_US * MINUTE_US


@pytest.fixture(params=BACKENDS)
async def timeseries(
    request: pytest.FixtureRequest,
    pg_url: str,
    sqlite_url: str,
    used_device_ids: list[str],
) -> AsyncIterator[TimeSeriesStore]:
    """An empty store of each backend (the live server: empty for this test's devices)."""
    backend: str = request.param
    if backend.startswith("sql-"):
        url = pg_url if backend == "sql-postgresql" else sqlite_url
        await empty_tables(url)
        database = Database(build_engine(url))
        try:
            yield SqlTimeSeriesStore(database)
        finally:
            await database.close()
    elif backend == "influx-fake":
        async with FakeInflux() as fake:
            store = InfluxTimeSeriesStore(fake.url, fake.token, fake.org, fake.bucket, timeout=5.0)
            try:
                yield store
            finally:
                await store.aclose()
    else:
        store = InfluxTimeSeriesStore(LIVE_URL, LIVE_TOKEN, LIVE_ORG, LIVE_BUCKET, timeout=10.0)
        try:
            yield store
        finally:
            await store.aclose()
            await delete_live_points(used_device_ids)


# --- Raw queries -----------------------------------------------------------------------------


async def test_written_values_come_back_exactly_ordered_by_field_then_time(
    timeseries: TimeSeriesStore, new_device: Callable[[], str], base_us: int
) -> None:
    device, other = new_device(), new_device()
    # Odd microseconds on purpose; written out of order; "Humidity" sorts before "door_open"
    # by code point (a linguistic collation would put it after).
    await timeseries.write(
        [
            reading(device, base_us + 2 * SECOND_US + 7, {"temperature": 21.25, "Humidity": 40.5}),
            reading(device, base_us + 1, {"temperature": -3.125, "door_open": True}),
            reading(device, base_us + SECOND_US + 999_999, {"temperature": 1e-7}),
            reading(other, base_us + 1, {"temperature": 99.0, "door_open": False}),
        ]
    )
    points = await timeseries.query(SeriesQuery(device, base_us, base_us + MINUTE_US))
    assert points == [
        SeriesPoint("Humidity", base_us + 2 * SECOND_US + 7, 40.5),
        SeriesPoint("door_open", base_us + 1, 1.0),
        SeriesPoint("temperature", base_us + 1, -3.125),
        SeriesPoint("temperature", base_us + SECOND_US + 999_999, 1e-7),
        SeriesPoint("temperature", base_us + 2 * SECOND_US + 7, 21.25),
    ]


async def test_booleans_read_as_one_and_zero_and_integers_as_floats(
    timeseries: TimeSeriesStore, new_device: Callable[[], str], base_us: int
) -> None:
    device = new_device()
    await timeseries.write(
        [
            reading(device, base_us, {"door_open": True, "temperature": 21}),
            reading(device, base_us + SECOND_US, {"door_open": False, "temperature": -4}),
        ]
    )
    points = await timeseries.query(SeriesQuery(device, base_us, base_us + MINUTE_US))
    assert points == [
        SeriesPoint("door_open", base_us, 1.0),
        SeriesPoint("door_open", base_us + SECOND_US, 0.0),
        SeriesPoint("temperature", base_us, 21.0),
        SeriesPoint("temperature", base_us + SECOND_US, -4.0),
    ]
    assert all(type(point.value) is float for point in points)


async def test_the_range_includes_start_and_excludes_stop(
    timeseries: TimeSeriesStore, new_device: Callable[[], str], base_us: int
) -> None:
    device = new_device()
    start, stop = base_us + 10 * SECOND_US, base_us + 20 * SECOND_US
    stamps = [start - 1, start, start + 1, stop - 1, stop, stop + 1]
    await timeseries.write(
        [reading(device, at, {"temperature": float(i)}) for i, at in enumerate(stamps)]
    )
    points = await timeseries.query(SeriesQuery(device, start, stop))
    assert points == [
        SeriesPoint("temperature", start, 1.0),
        SeriesPoint("temperature", start + 1, 2.0),
        SeriesPoint("temperature", stop - 1, 3.0),
    ]
    assert await timeseries.query(SeriesQuery(device, stop, stop)) == []
    assert await timeseries.query(SeriesQuery(device, stop, start)) == []


async def test_fields_select_only_those_fields(
    timeseries: TimeSeriesStore, new_device: Callable[[], str], base_us: int
) -> None:
    device = new_device()
    await timeseries.write(
        [
            reading(device, base_us + i * SECOND_US, {"a": float(i), "b": -i, "c": i % 2 == 0})
            for i in range(3)
        ]
    )
    window = (device, base_us, base_us + MINUTE_US)
    only_b = await timeseries.query(SeriesQuery(*window, fields=["b"]))
    assert [(p.field, p.value) for p in only_b] == [("b", 0.0), ("b", -1.0), ("b", -2.0)]
    c_and_a = await timeseries.query(SeriesQuery(*window, fields=["c", "a", "missing"]))
    assert [(p.field, p.value) for p in c_and_a] == [
        ("a", 0.0),
        ("a", 1.0),
        ("a", 2.0),
        ("c", 1.0),
        ("c", 0.0),
        ("c", 1.0),
    ]
    assert await timeseries.query(SeriesQuery(*window, fields=["missing"])) == []
    # An empty selection selects nothing (None is "every field").
    assert await timeseries.query(SeriesQuery(*window, fields=[])) == []


async def test_another_devices_data_never_appears(
    timeseries: TimeSeriesStore, new_device: Callable[[], str], base_us: int
) -> None:
    device, neighbour, silent = new_device(), new_device(), new_device()
    await timeseries.write(
        [
            reading(device, base_us, {"temperature": 1.0}),
            reading(neighbour, base_us, {"temperature": 2.0, "door_open": True}),
            reading(neighbour, base_us + SECOND_US, {"temperature": 3.0}),
        ]
    )
    span = (base_us, base_us + MINUTE_US)
    assert await timeseries.query(SeriesQuery(device, *span)) == [
        SeriesPoint("temperature", base_us, 1.0)
    ]
    assert await timeseries.query(SeriesQuery(silent, *span)) == []
    windowed = await timeseries.query(
        SeriesQuery(device, *span, every_us=MINUTE_US, aggregate="count")
    )
    assert windowed == [SeriesPoint("temperature", base_us, 1.0)]


async def test_limit_caps_the_points_in_field_then_time_order(
    timeseries: TimeSeriesStore, new_device: Callable[[], str], base_us: int
) -> None:
    device = new_device()
    await timeseries.write(
        [
            reading(device, base_us + i * SECOND_US, {"a": float(i), "b": float(10 + i)})
            for i in range(5)
        ]
    )
    span = (device, base_us, base_us + MINUTE_US)
    limited = await timeseries.query(SeriesQuery(*span, limit=7))
    assert [(p.field, p.value) for p in limited] == [
        *[("a", float(i)) for i in range(5)],
        ("b", 10.0),
        ("b", 11.0),
    ]
    assert len(await timeseries.query(SeriesQuery(*span, limit=1))) == 1
    assert await timeseries.query(SeriesQuery(*span, limit=0)) == []
    assert len(await timeseries.query(SeriesQuery(*span, limit=10))) == 10


# --- Rewrites ---------------------------------------------------------------------------------


async def test_redelivered_readings_leave_one_point_per_field_and_time(
    timeseries: TimeSeriesStore, new_device: Callable[[], str], base_us: int
) -> None:
    device = new_device()
    batch = [
        reading(device, base_us + i * SECOND_US, {"temperature": 20.0 + i, "door_open": i == 1})
        for i in range(3)
    ]
    await timeseries.write(batch)
    await timeseries.write(batch)
    await timeseries.write([*batch[1:], batch[0], batch[0]])
    points = await timeseries.query(SeriesQuery(device, base_us, base_us + MINUTE_US))
    assert points == [
        SeriesPoint("door_open", base_us, 0.0),
        SeriesPoint("door_open", base_us + SECOND_US, 1.0),
        SeriesPoint("door_open", base_us + 2 * SECOND_US, 0.0),
        SeriesPoint("temperature", base_us, 20.0),
        SeriesPoint("temperature", base_us + SECOND_US, 21.0),
        SeriesPoint("temperature", base_us + 2 * SECOND_US, 22.0),
    ]


async def test_a_new_value_for_the_same_field_and_time_overwrites(
    timeseries: TimeSeriesStore, new_device: Callable[[], str], base_us: int
) -> None:
    device = new_device()
    later = base_us + SECOND_US
    await timeseries.write(
        [
            reading(device, base_us, {"temperature": 1.0, "humidity": 30.0}),
            reading(device, later, {"temperature": 2.0}),
        ]
    )
    # A second batch, and within one batch: the last value written wins.
    await timeseries.write([reading(device, base_us, {"temperature": 10.0})])
    await timeseries.write(
        [
            reading(device, later, {"temperature": 20.0}),
            reading(device, later, {"temperature": 3.5}),
        ]
    )
    assert await timeseries.query(SeriesQuery(device, base_us, base_us + MINUTE_US)) == [
        SeriesPoint("humidity", base_us, 30.0),
        SeriesPoint("temperature", base_us, 10.0),
        SeriesPoint("temperature", later, 3.5),
    ]
    assert (await timeseries.latest([device]))[device] == {
        "humidity": SeriesPoint("humidity", base_us, 30.0),
        "temperature": SeriesPoint("temperature", later, 3.5),
    }


# --- Windows ----------------------------------------------------------------------------------


def window_data(device: str, base_us: int) -> list[ReadingSet]:
    """120 readings 1 s apart from `base_us` (`temperature` = i as an int, `door_open` = i even),
    then `temperature` only: 1000 at +3 min 30 s and 5000 at +3 min 50 s. Minute 2 is empty."""
    return [
        *(
            reading(device, base_us + i * SECOND_US, {"temperature": i, "door_open": i % 2 == 0})
            for i in range(120)
        ),
        reading(device, base_us + 210 * SECOND_US, {"temperature": 1000.0}),
        reading(device, base_us + 230 * SECOND_US, {"temperature": 5000.0}),
    ]


# The query runs from +7 s to +3 min 45 s with one-minute windows. The first window is cut by the
# start: its value covers only i = 7..59, yet its time is the minute's start (base), not +7 s.
# The last one is cut by the stop: the 5000 at +3 min 50 s is outside. Minute 2 has no point.
# Per aggregate: door_open at +0 and +1 min; temperature at +0, +1 min and +3 min.
EXPECTED_WINDOWS: dict[str, tuple[tuple[float, float], tuple[float, float, float]]] = {
    "mean": ((26 / 53, 0.5), (33.0, 89.5, 1000.0)),
    "min": ((0.0, 0.0), (7.0, 60.0, 1000.0)),
    "max": ((1.0, 1.0), (59.0, 119.0, 1000.0)),
    "sum": ((26.0, 30.0), (1749.0, 5370.0, 1000.0)),
    "count": ((53.0, 60.0), (53.0, 60.0, 1.0)),
    "first": ((0.0, 1.0), (7.0, 60.0, 1000.0)),
    "last": ((0.0, 0.0), (59.0, 119.0, 1000.0)),
}


@pytest.mark.parametrize("aggregate", AGGREGATES)
async def test_each_aggregate_per_epoch_aligned_window(
    timeseries: TimeSeriesStore,
    new_device: Callable[[], str],
    base_us: int,
    aggregate: Aggregate,
) -> None:
    device = new_device()
    await timeseries.write(window_data(device, base_us))
    points = await timeseries.query(
        SeriesQuery(
            device,
            base_us + 7 * SECOND_US,
            base_us + 225 * SECOND_US,
            every_us=MINUTE_US,
            aggregate=aggregate,
        )
    )
    (door0, door1), (temp0, temp1, temp3) = EXPECTED_WINDOWS[aggregate]
    assert [(p.field, p.epoch_us) for p in points] == [
        ("door_open", base_us),
        ("door_open", base_us + MINUTE_US),
        ("temperature", base_us),
        ("temperature", base_us + MINUTE_US),
        ("temperature", base_us + 3 * MINUTE_US),
    ]
    # A mean may be summed in another order by another engine: allow the last bits.
    values = [point.value for point in points]
    assert values == pytest.approx([door0, door1, temp0, temp1, temp3], rel=1e-12, abs=0)
    assert all(type(value) is float for value in values)


async def test_windows_fields_and_limit_combine(
    timeseries: TimeSeriesStore, new_device: Callable[[], str], base_us: int
) -> None:
    device = new_device()
    await timeseries.write(window_data(device, base_us))
    window = SeriesQuery(
        device, base_us, base_us + 4 * MINUTE_US, every_us=MINUTE_US, aggregate="max", limit=3
    )
    assert await timeseries.query(window) == [
        SeriesPoint("door_open", base_us, 1.0),
        SeriesPoint("door_open", base_us + MINUTE_US, 1.0),
        SeriesPoint("temperature", base_us, 59.0),
    ]
    only_temperature = SeriesQuery(
        device,
        base_us,
        base_us + 4 * MINUTE_US,
        fields=["temperature"],
        every_us=MINUTE_US,
        aggregate="max",
    )
    assert await timeseries.query(only_temperature) == [
        SeriesPoint("temperature", base_us, 59.0),
        SeriesPoint("temperature", base_us + MINUTE_US, 119.0),
        SeriesPoint("temperature", base_us + 3 * MINUTE_US, 5000.0),
    ]


async def test_windows_before_1970_are_aligned_to_the_epoch_too(
    timeseries: TimeSeriesStore, new_device: Callable[[], str]
) -> None:
    """A device with an unset clock may send 1969 times; windows still start at whole minutes."""
    device = new_device()
    await timeseries.write(
        [
            reading(device, -90 * SECOND_US, {"temperature": 1.0}),
            reading(device, -30 * SECOND_US, {"temperature": 2.0}),
            reading(device, 30 * SECOND_US, {"temperature": 4.0}),
        ]
    )
    points = await timeseries.query(
        SeriesQuery(device, -2 * MINUTE_US, MINUTE_US, every_us=MINUTE_US, aggregate="sum")
    )
    assert points == [
        SeriesPoint("temperature", -2 * MINUTE_US, 1.0),
        SeriesPoint("temperature", -MINUTE_US, 2.0),
        SeriesPoint("temperature", 0, 4.0),
    ]


@pytest.mark.parametrize("every_us", [0, -MINUTE_US])
async def test_a_window_that_is_not_positive_is_refused(
    timeseries: TimeSeriesStore, new_device: Callable[[], str], base_us: int, every_us: int
) -> None:
    device = new_device()
    await timeseries.write([reading(device, base_us, {"temperature": 1.0})])
    with pytest.raises(ValidationFailed):
        await timeseries.query(SeriesQuery(device, base_us, base_us + MINUTE_US, every_us=every_us))


# --- Latest and health ------------------------------------------------------------------------


async def test_latest_gives_the_newest_value_per_field_per_device(
    timeseries: TimeSeriesStore, new_device: Callable[[], str], base_us: int
) -> None:
    first, second, silent = new_device(), new_device(), new_device()
    await timeseries.write(
        [
            reading(first, base_us + 20 * SECOND_US, {"temperature": 21.0}),
            reading(first, base_us + 5 * SECOND_US, {"temperature": 20.0, "door_open": True}),
            reading(first, base_us + 30 * SECOND_US + 1, {"humidity": 40}),
            reading(second, base_us + 2 * SECOND_US, {"temperature": 5.0}),
            reading(second, base_us + SECOND_US, {"temperature": 4.0}),
        ]
    )
    expected = {
        first: {
            "temperature": SeriesPoint("temperature", base_us + 20 * SECOND_US, 21.0),
            "door_open": SeriesPoint("door_open", base_us + 5 * SECOND_US, 1.0),
            "humidity": SeriesPoint("humidity", base_us + 30 * SECOND_US + 1, 40.0),
        },
        second: {"temperature": SeriesPoint("temperature", base_us + 2 * SECOND_US, 5.0)},
    }
    assert await timeseries.latest([first, second, silent]) == expected
    assert await timeseries.latest([silent]) == {}
    assert await timeseries.latest([]) == {}

    # Late, older readings (a device's backlog) do not move latest backwards.
    await timeseries.write(
        [
            reading(first, base_us, {"temperature": -1.0, "door_open": False}),
            reading(second, base_us + SECOND_US + 500_000, {"temperature": -2.0}),
        ]
    )
    assert await timeseries.latest([second, first, silent]) == expected
    assert await timeseries.latest([second]) == {second: expected[second]}


async def test_health_returns_a_detail(timeseries: TimeSeriesStore) -> None:
    detail = await timeseries.health()
    assert isinstance(detail, str)
    assert detail
