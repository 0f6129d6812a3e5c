"""`TimeSeriesStore.scan` and the export service over every store (SQL on PostgreSQL and
SQLite, InfluxDB): one series in time order within its limit and range; every point of an
export exactly once, device then time then field; a resume from any cursor gives the rest of
the export exactly. The export reads only through `scan` and `latest`."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable

import pytest

from iotmeter.db.engine import Database, build_engine
from iotmeter.errors import ValidationFailed
from iotmeter.services import export as service
from iotmeter.storage.timeseries.base import TimeSeriesStore
from tests.contract import test_timeseries_contract as contract
from tests.fixtures.readings import MINUTE_US, SECOND_US, reading

Row = tuple[str, int, str, float]

# The store fixtures of the Protocol's contract suite: every backend, each test its own devices.
timeseries = contract.timeseries
new_device = contract.new_device
used_device_ids = contract.used_device_ids
base_us = contract.base_us


@pytest.fixture
async def registry(sqlite_url: str) -> AsyncIterator[Database]:
    """An empty registry: the fields come from the store's latest values alone."""
    from tests.conftest import empty_tables

    await empty_tables(sqlite_url)
    database = Database(build_engine(sqlite_url))
    try:
        yield database
    finally:
        await database.close()


async def write_points(
    store: TimeSeriesStore, devices: list[str], base_us: int, seed: int
) -> list[Row]:
    """Irregular points: fields that share times and fields that do not, odd microseconds."""
    chooser = random.Random(seed)
    rows: list[Row] = []
    readings = []
    for index, device_id in enumerate(devices):
        fields = ["a", "b.x", "C"][: 3 - index % 2]
        epoch_us = base_us + index
        for _ in range(40):
            epoch_us += chooser.choice([1, 7, SECOND_US, 3 * SECOND_US + 11])
            values = {
                field: float(chooser.randint(-1000, 1000)) / 8
                for field in fields
                if chooser.random() < 0.7
            } or {fields[0]: 0.5}
            readings.append(reading(device_id, epoch_us, values))
            rows.extend((device_id, epoch_us, field, value) for field, value in values.items())
    await store.write(readings)
    return sorted(rows, key=lambda row: (row[0], row[1], row[2]))


async def export_rows(
    database: Database,
    store: TimeSeriesStore,
    plan: service.TelemetryExport,
) -> tuple[list[Row], list[tuple[int, str]]]:
    """Every row of the export, and after how many rows each cursor came."""
    rows: list[Row] = []
    cursors: list[tuple[int, str]] = []
    async for batch in service.telemetry_batches(database, store, plan):
        # Each of a device's (at most 3) field streams holds at most a chunk at a time.
        assert 0 < len(batch.rows) <= 3 * plan.chunk_points
        rows.extend((batch.device_id, t, f, v) for t, f, v in batch.rows)
        cursors.append((len(rows), batch.cursor))
    return rows, cursors


def plan(
    devices: list[str],
    base_us: int,
    *,
    after: str | None = None,
    fields: list[str] | None = None,
    chunk: int = 7,
) -> service.TelemetryExport:
    return service.plan_telemetry_export(
        devices,
        selection=service.selection_digest("ids:" + ",".join(sorted(devices)), fields),
        fields=fields,
        start_us=base_us,
        stop_us=base_us + 10 * MINUTE_US,
        after=after,
        chunk_points=chunk,
    )


async def test_scan_reads_one_series_in_time_order_within_limit_and_range(
    timeseries: TimeSeriesStore, new_device: Callable[[], str], base_us: int
) -> None:
    device, other = new_device(), new_device()
    await timeseries.write(
        [
            reading(device, base_us + 3 * SECOND_US, {"a": 3.0, "b": 30.0}),
            reading(device, base_us + 1, {"a": 1.0}),
            reading(device, base_us + 2 * SECOND_US + 7, {"a": -2.5, "b": 20.0}),
            reading(device, base_us, {"b": 10.0}),
            reading(device, base_us + 10 * MINUTE_US, {"a": 9.0}),  # at stop
            reading(other, base_us + 5, {"a": 5.0}),
        ]
    )
    stop = base_us + 10 * MINUTE_US

    assert await timeseries.scan(device, "a", base_us, stop, 10) == [
        (base_us + 1, 1.0),
        (base_us + 2 * SECOND_US + 7, -2.5),
        (base_us + 3 * SECOND_US, 3.0),
    ]
    assert await timeseries.scan(device, "a", base_us, stop, 2) == [
        (base_us + 1, 1.0),
        (base_us + 2 * SECOND_US + 7, -2.5),
    ]
    # The next read of a keyset: from just after the last time read.
    assert await timeseries.scan(device, "a", base_us + 2 * SECOND_US + 8, stop, 2) == [
        (base_us + 3 * SECOND_US, 3.0)
    ]
    assert await timeseries.scan(device, "b", base_us + 1, stop, 10) == [
        (base_us + 2 * SECOND_US + 7, 20.0),
        (base_us + 3 * SECOND_US, 30.0),
    ]
    assert await timeseries.scan(device, "c", base_us, stop, 10) == []
    assert await timeseries.scan(device, "a", stop, stop, 10) == []


async def test_every_point_once_in_device_time_field_order_and_resume_from_each_cursor(
    timeseries: TimeSeriesStore,
    registry: Database,
    new_device: Callable[[], str],
    base_us: int,
) -> None:
    devices = sorted([new_device(), new_device(), new_device()])
    expected = await write_points(timeseries, devices, base_us, seed=15)

    rows, cursors = await export_rows(registry, timeseries, plan(devices, base_us))

    assert rows == expected
    assert len(cursors) >= len(expected) // 21  # a cursor after every batch
    for done, cursor in cursors:
        rest, _ = await export_rows(registry, timeseries, plan(devices, base_us, after=cursor))
        assert rows[:done] + rest == expected, f"resumed after {done} rows"


async def test_fields_filter_and_range_bounds(
    timeseries: TimeSeriesStore,
    registry: Database,
    new_device: Callable[[], str],
    base_us: int,
) -> None:
    device = new_device()
    await timeseries.write(
        [
            reading(device, base_us - 1, {"a": 1.0, "b": 1.0}),  # before start
            reading(device, base_us, {"a": 2.0, "b": 2.0}),
            reading(device, base_us + 10 * MINUTE_US - 1, {"a": 3.0}),
            reading(device, base_us + 10 * MINUTE_US, {"a": 4.0}),  # at stop
        ]
    )

    rows, _ = await export_rows(registry, timeseries, plan([device], base_us, fields=["a"]))

    assert rows == [(device, base_us, "a", 2.0), (device, base_us + 10 * MINUTE_US - 1, "a", 3.0)]


async def test_a_cursor_of_another_selection_is_refused(
    timeseries: TimeSeriesStore,
    registry: Database,
    new_device: Callable[[], str],
    base_us: int,
) -> None:
    device = new_device()
    await timeseries.write([reading(device, base_us + SECOND_US, {"a": 1.0, "b": 2.0})])
    _, cursors = await export_rows(registry, timeseries, plan([device], base_us, chunk=1))

    with pytest.raises(ValidationFailed, match="belongs to an export of other"):
        plan([device], base_us, after=cursors[0][1], fields=["a"])
