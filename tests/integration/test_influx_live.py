"""The InfluxDB store against a real InfluxDB 2.x, where one is configured.

Set `IOTMETER_TEST_INFLUX_URL` and `IOTMETER_TEST_INFLUX_TOKEN` (and optionally
`IOTMETER_TEST_INFLUX_ORG` / `IOTMETER_TEST_INFLUX_BUCKET`, default iot-org / iot-metrics; the
bucket must exist and the token must read, write and delete in it). Each test writes under its
own device ids (and, where field types matter, its own field names) and deletes its points
afterwards, so runs do not see each other. The bucket-creation test makes (and deletes) its own
bucket `iotmeter-live-<run id>`: it needs a token that may create and delete buckets in the org.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import aiohttp
import pytest
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

from iotmeter.errors import BackendUnavailable
from iotmeter.readings import ReadingSet
from iotmeter.storage.timeseries.base import AGGREGATES, Aggregate, SeriesPoint, SeriesQuery
from iotmeter.storage.timeseries.influx import (
    InfluxRejected,
    InfluxTimeSeriesStore,
    InfluxUnavailable,
)
from tests.fixtures.readings import HOUR_US, MINUTE_US, SECOND_US, reading

DAY_S = 86_400

URL = os.environ.get("IOTMETER_TEST_INFLUX_URL", "")
TOKEN = os.environ.get("IOTMETER_TEST_INFLUX_TOKEN", "")
ORG = os.environ.get("IOTMETER_TEST_INFLUX_ORG", "iot-org")
BUCKET = os.environ.get("IOTMETER_TEST_INFLUX_BUCKET", "iot-metrics")

# No InfluxDB 2.x server can run on the CI machine (see README, "What was verified"): this
# suite runs only where one is given. Given a URL, it must run: a missing token or an
# unreachable server fails it, never skips it.
pytestmark = [
    pytest.mark.skipif(
        not URL, reason="no live InfluxDB 2.x given (set IOTMETER_TEST_INFLUX_URL and _TOKEN)"
    ),
    pytest.mark.influx_live,
]


@pytest.fixture(autouse=True)
def token_given() -> None:
    assert TOKEN, "IOTMETER_TEST_INFLUX_URL is set but IOTMETER_TEST_INFLUX_TOKEN is not"


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def base_us() -> int:
    """A whole minute an hour ago: inside any retention period, never in the future."""
    now_us = time.time_ns() // 1000
    return (now_us - HOUR_US) // MINUTE_US * MINUTE_US


@pytest.fixture
async def device(run_id: str) -> AsyncIterator[Callable[[str], str]]:
    """`device("a")` names a device of this test; its points are deleted afterwards."""
    used: list[str] = []

    def name(suffix: str) -> str:
        used.append(f"live-{run_id}-{suffix}")
        return used[-1]

    yield name
    # The delete API takes `=` and AND only (no OR, no regex): one call per device.
    async with InfluxDBClientAsync(url=URL, token=TOKEN, org=ORG) as client:
        for device_id in used:
            assert await client.delete_api().delete(
                datetime(1970, 1, 1, tzinfo=UTC),
                datetime(2100, 1, 1, tzinfo=UTC),
                f'_measurement="iot_telemetry" AND device_id="{device_id}"',
                BUCKET,
                ORG,
            )


@pytest.fixture
async def store() -> AsyncIterator[InfluxTimeSeriesStore]:
    opened = InfluxTimeSeriesStore(URL, TOKEN, ORG, BUCKET, timeout=10.0)
    try:
        yield opened
    finally:
        await opened.aclose()


def window_readings(device_id: str, base_us: int) -> list[ReadingSet]:
    samples = [(0, 1.0, True), (20, 2, False), (40, 6.0, True), (70, 10, False)]
    return [
        reading(device_id, base_us + seconds * SECOND_US, {"t": t, "on": on})
        for seconds, t, on in samples
    ]


async def test_health(store: InfluxTimeSeriesStore) -> None:
    detail = await store.health()
    assert detail is not None
    assert detail.startswith("influxdb")


async def test_written_readings_come_back_ordered_by_field_then_time(
    store: InfluxTimeSeriesStore, device: Callable[[str], str], base_us: int
) -> None:
    first, other = device("1"), device("2")
    await store.write(
        [
            reading(first, base_us + 2 * SECOND_US, {"t": 21.5, "on": False}),
            reading(first, base_us, {"t": 21, "on": True}),
            reading(other, base_us, {"t": 99.0}),
        ]
    )
    points = await store.query(SeriesQuery(first, base_us, base_us + MINUTE_US))
    assert points == [
        SeriesPoint("on", base_us, 1.0),
        SeriesPoint("on", base_us + 2 * SECOND_US, 0.0),
        SeriesPoint("t", base_us, 21.0),
        SeriesPoint("t", base_us + 2 * SECOND_US, 21.5),
    ]
    stop_excluded = await store.query(SeriesQuery(first, base_us, base_us + 2 * SECOND_US))
    assert {point.epoch_us for point in stop_excluded} == {base_us}


_EXPECTED_WINDOWS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "mean": ((4.0, 10.0), (0.5, 0.0)),
    "min": ((2.0, 10.0), (0.0, 0.0)),
    "max": ((6.0, 10.0), (1.0, 0.0)),
    "sum": ((8.0, 10.0), (1.0, 0.0)),
    "count": ((2.0, 1.0), (2.0, 1.0)),
    "first": ((2.0, 10.0), (0.0, 0.0)),
    "last": ((6.0, 10.0), (1.0, 0.0)),
}


@pytest.mark.parametrize("aggregate", AGGREGATES)
async def test_each_aggregate_per_epoch_aligned_window(
    store: InfluxTimeSeriesStore,
    device: Callable[[str], str],
    base_us: int,
    aggregate: Aggregate,
) -> None:
    windowed = device("w")
    await store.write(window_readings(windowed, base_us))
    points = await store.query(
        SeriesQuery(
            windowed,
            base_us + 10 * SECOND_US,
            base_us + 2 * MINUTE_US,
            every_us=MINUTE_US,
            aggregate=aggregate,
        )
    )
    (t0, t1), (on0, on1) = _EXPECTED_WINDOWS[aggregate]
    assert points == [
        SeriesPoint("on", base_us, on0),
        SeriesPoint("on", base_us + MINUTE_US, on1),
        SeriesPoint("t", base_us, t0),
        SeriesPoint("t", base_us + MINUTE_US, t1),
    ]


async def test_latest_gives_the_newest_point_per_device_and_field(
    store: InfluxTimeSeriesStore, device: Callable[[str], str]
) -> None:
    now_us = time.time_ns() // 1000
    first, second, silent = device("a"), device("b"), device("c")
    await store.write(
        [
            reading(first, now_us - 2 * HOUR_US, {"t": 20.0, "on": True}),
            reading(first, now_us - HOUR_US, {"t": 21.0}),
            reading(first, now_us - 30 * MINUTE_US, {"hum": 40.0}, device_type="humidity"),
            reading(first, now_us - 3 * HOUR_US, {"hum": 35.0}),
            reading(second, now_us + MINUTE_US, {"t": 5.0}),
        ]
    )
    assert await store.latest([first, second, silent]) == {
        first: {
            "t": SeriesPoint("t", now_us - HOUR_US, 21.0),
            "on": SeriesPoint("on", now_us - 2 * HOUR_US, 1.0),
            "hum": SeriesPoint("hum", now_us - 30 * MINUTE_US, 40.0),
        },
        second: {"t": SeriesPoint("t", now_us + MINUTE_US, 5.0)},
    }


async def test_rewriting_the_same_readings_changes_nothing(
    store: InfluxTimeSeriesStore, device: Callable[[str], str], base_us: int
) -> None:
    rewritten = device("r")
    batch = window_readings(rewritten, base_us)
    await store.write(batch)
    first = await store.query(SeriesQuery(rewritten, base_us, base_us + HOUR_US))
    await store.write(batch)
    await store.write(batch[1:3])
    assert await store.query(SeriesQuery(rewritten, base_us, base_us + HOUR_US)) == first
    assert len(first) == 8


async def test_special_characters_and_injection_attempts(
    store: InfluxTimeSeriesStore, device: Callable[[str], str], base_us: int
) -> None:
    odd = device("s")
    await store.write([reading(odd, base_us, {"t": 1.0}, device_type='a b,c=d\\e "f" ü')])
    assert await store.query(SeriesQuery(odd, base_us, base_us + 1)) == [
        SeriesPoint("t", base_us, 1.0)
    ]
    sneaky = f'{odd}" or true or "'
    assert await store.query(SeriesQuery(sneaky, base_us, base_us + 1)) == []


async def test_a_type_conflict_refuses_only_that_reading_set(
    store: InfluxTimeSeriesStore, device: Callable[[str], str], run_id: str, base_us: int
) -> None:
    good, other = device("x"), device("y")
    relay = f"relay_{run_id}"  # field types are per measurement: a field of this run only
    await store.write([reading(good, base_us, {relay: 1.0})])
    batch = [
        reading(good, base_us + i * SECOND_US, {relay: float(i), "t": 20.0 + i})
        for i in range(1, 9)
    ]
    bad = reading(other, base_us + 4500 * 1000, {relay: True, "t": 0.0})
    batch.insert(4, bad)
    with pytest.raises(InfluxRejected) as caught:
        await store.write(batch)
    assert [rejected for rejected, _ in caught.value.rejected] == [bad]
    assert "conflict" in caught.value.rejected[0][1]
    assert caught.value.written == 8
    written = await store.query(SeriesQuery(good, base_us, base_us + MINUTE_US, fields=[relay]))
    assert [point.value for point in written] == [1.0, *(float(i) for i in range(1, 9))]


async def test_a_wrong_token_is_unavailable_and_says_so() -> None:
    store = InfluxTimeSeriesStore(URL, "not-the-token", ORG, BUCKET)
    try:
        with pytest.raises(InfluxUnavailable, match="token") as caught:
            await store.write([reading("live-token", time.time_ns() // 1000, {"t": 1.0})])
        assert isinstance(caught.value, BackendUnavailable)
        assert caught.value.status == 401
    finally:
        await store.aclose()


async def _delete_bucket(name: str) -> None:
    headers = {"Authorization": f"Token {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(
            f"{URL}/api/v2/buckets", params={"name": name, "org": ORG}
        ) as response:
            found = (await response.json()).get("buckets") or []
        for bucket in found:
            async with session.delete(f"{URL}/api/v2/buckets/{bucket['id']}") as response:
                assert response.status == 204, await response.text()


async def test_a_missing_bucket_is_created_with_the_retention_period(run_id: str) -> None:
    name = f"iotmeter-live-{run_id}"
    store = InfluxTimeSeriesStore(URL, TOKEN, ORG, name, timeout=10.0)
    try:
        assert await store.ensure_bucket(2) == "created", (
            "the bucket was not created: this test needs a token that may create buckets"
        )
        assert store.retention_s == 2 * DAY_S
        # The next start finds it; another setting is reported, never applied.
        assert await store.ensure_bucket(2) == "matches"
        assert await store.ensure_bucket(3) == "differs"
        assert store.retention_s == 2 * DAY_S
        written_us = (time.time_ns() // 1000 - HOUR_US) // SECOND_US * SECOND_US
        await store.write([reading("live-retention", written_us, {"t": 1.0, "on": True})])
        usage = await store.usage()
        assert usage.oldest_us == written_us
        assert usage.bytes_used is None
    finally:
        await store.aclose()
        await _delete_bucket(name)
