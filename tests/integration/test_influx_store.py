"""The InfluxDB store over real HTTP against the fake InfluxDB 2.x (no real one can run here).

The same checks run against a real server in `test_influx_live.py` when one is configured.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iotmeter.config import Settings
from iotmeter.errors import BackendUnavailable, SettingsInvalid
from iotmeter.readings import ReadingSet
from iotmeter.storage.timeseries import influx as influx_module
from iotmeter.storage.timeseries.base import AGGREGATES, Aggregate, SeriesPoint, SeriesQuery
from iotmeter.storage.timeseries.influx import (
    InfluxQueryFailed,
    InfluxRejected,
    InfluxTimeSeriesStore,
    InfluxUnavailable,
    open_influx_store,
)
from tests.fixtures.fake_influx import FakeInflux
from tests.fixtures.readings import HOUR_US, MINUTE_US, SECOND_US, reading

BASE_US = 1_714_521_600_000_000  # 2024-05-01T00:00:00Z, a whole minute


def make_store(fake: FakeInflux, **options: object) -> InfluxTimeSeriesStore:
    values: dict[str, object] = {"timeout": 2.0}
    values.update(options)
    return InfluxTimeSeriesStore(fake.url, fake.token, fake.org, fake.bucket, **values)  # type: ignore[arg-type]


@pytest.fixture
async def fake() -> AsyncIterator[FakeInflux]:
    async with FakeInflux() as server:
        yield server


@pytest.fixture
async def store(fake: FakeInflux) -> AsyncIterator[InfluxTimeSeriesStore]:
    opened = make_store(fake)
    try:
        yield opened
    finally:
        await opened.aclose()


def window_readings() -> list[ReadingSet]:
    """d1: `t` and boolean `on` at +0 s, +20 s, +40 s (first minute) and +70 s (second)."""
    samples = [(0, 1.0, True), (20, 2, False), (40, 6.0, True), (70, 10, False)]
    return [
        reading("d1", BASE_US + seconds * SECOND_US, {"t": t, "on": on})
        for seconds, t, on in samples
    ]


# --- Writes and queries ----------------------------------------------------------------------


async def test_written_readings_come_back_ordered_by_field_then_time(
    store: InfluxTimeSeriesStore,
) -> None:
    await store.write(
        [
            reading("d1", BASE_US + 2 * SECOND_US, {"t": 21.5, "on": False}),
            reading("d1", BASE_US, {"t": 21, "on": True}),
            reading("d2", BASE_US, {"t": 99.0}),
        ]
    )
    points = await store.query(SeriesQuery("d1", BASE_US, BASE_US + MINUTE_US))
    assert points == [
        SeriesPoint("on", BASE_US, 1.0),
        SeriesPoint("on", BASE_US + 2 * SECOND_US, 0.0),
        SeriesPoint("t", BASE_US, 21.0),
        SeriesPoint("t", BASE_US + 2 * SECOND_US, 21.5),
    ]


async def test_the_range_includes_start_and_excludes_stop(store: InfluxTimeSeriesStore) -> None:
    await store.write([reading("d1", BASE_US + i * SECOND_US, {"t": float(i)}) for i in range(4)])
    points = await store.query(SeriesQuery("d1", BASE_US + SECOND_US, BASE_US + 3 * SECOND_US))
    assert [point.value for point in points] == [1.0, 2.0]


async def test_fields_and_limit_narrow_the_result(store: InfluxTimeSeriesStore) -> None:
    await store.write(
        [reading("d1", BASE_US + i * SECOND_US, {"a": float(i), "b": -i, "c": i}) for i in range(5)]
    )
    only_b = await store.query(SeriesQuery("d1", BASE_US, BASE_US + MINUTE_US, fields=["b"]))
    assert [(p.field, p.value) for p in only_b] == [("b", -float(i)) for i in range(5)]
    limited = await store.query(
        SeriesQuery("d1", BASE_US, BASE_US + MINUTE_US, fields=["c", "a"], limit=7)
    )
    assert [(p.field, p.value) for p in limited] == [
        *[("a", float(i)) for i in range(5)],
        ("c", 0.0),
        ("c", 1.0),
    ]
    assert await store.query(SeriesQuery("d1", BASE_US, BASE_US + MINUTE_US, fields=[])) == []


_EXPECTED_WINDOWS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    # aggregate: ((t in minute 0, t in minute 1), (on in minute 0, on in minute 1)); the
    # query starts at +10 s, so the reading at +0 s is outside.
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
    store: InfluxTimeSeriesStore, aggregate: Aggregate
) -> None:
    await store.write(window_readings())
    points = await store.query(
        SeriesQuery(
            "d1",
            BASE_US + 10 * SECOND_US,
            BASE_US + 2 * MINUTE_US,
            every_us=MINUTE_US,
            aggregate=aggregate,
        )
    )
    (t0, t1), (on0, on1) = _EXPECTED_WINDOWS[aggregate]
    # Window times are the window starts, aligned to the epoch, even for the first window
    # that the range cuts (Flux itself would say +10 s there).
    assert points == [
        SeriesPoint("on", BASE_US, on0),
        SeriesPoint("on", BASE_US + MINUTE_US, on1),
        SeriesPoint("t", BASE_US, t0),
        SeriesPoint("t", BASE_US + MINUTE_US, t1),
    ]


async def test_latest_gives_the_newest_point_per_device_and_field(
    store: InfluxTimeSeriesStore,
) -> None:
    now_us = time.time_ns() // 1000
    await store.write(
        [
            reading("d1", now_us - 2 * HOUR_US, {"t": 20.0, "on": True}),
            reading("d1", now_us - HOUR_US, {"t": 21.0}),
            # The device was re-typed: a second series, and its point is the newest.
            reading("d1", now_us - 30 * MINUTE_US, {"hum": 40.0}, device_type="humidity"),
            reading("d1", now_us - 3 * HOUR_US, {"hum": 35.0}),
            # A device clock a minute fast still counts.
            reading("d2", now_us + MINUTE_US, {"t": 5.0}),
            # Older than the 30-day lookback.
            reading("d4", now_us - 31 * 24 * HOUR_US, {"t": 1.0}),
        ]
    )
    latest = await store.latest(["d1", "d2", "d3", "d4", "d1"])
    assert latest == {
        "d1": {
            "t": SeriesPoint("t", now_us - HOUR_US, 21.0),
            "on": SeriesPoint("on", now_us - 2 * HOUR_US, 1.0),
            "hum": SeriesPoint("hum", now_us - 30 * MINUTE_US, 40.0),
        },
        "d2": {"t": SeriesPoint("t", now_us + MINUTE_US, 5.0)},
    }
    assert await store.latest([]) == {}


async def test_latest_queries_many_devices_in_chunks(
    store: InfluxTimeSeriesStore, fake: FakeInflux, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(influx_module, "LATEST_DEVICES_PER_QUERY", 2)
    now_us = time.time_ns() // 1000
    await store.write([reading(f"d{i}", now_us - i, {"t": float(i)}) for i in range(5)])
    latest = await store.latest([f"d{i}" for i in range(5)])
    assert {device: fields["t"].value for device, fields in latest.items()} == {
        f"d{i}": float(i) for i in range(5)
    }
    assert len(fake.queries) == 3


async def test_rewriting_the_same_readings_changes_nothing(
    store: InfluxTimeSeriesStore, fake: FakeInflux
) -> None:
    batch = window_readings()
    await store.write(batch)
    stored = fake.point_count()
    first = await store.query(SeriesQuery("d1", BASE_US, BASE_US + HOUR_US))
    await store.write(batch)
    await store.write(batch[1:3])
    assert fake.point_count() == stored == 8
    assert await store.query(SeriesQuery("d1", BASE_US, BASE_US + HOUR_US)) == first


async def test_tag_values_with_special_characters_reach_the_server_intact(
    store: InfluxTimeSeriesStore, fake: FakeInflux
) -> None:
    odd_type = 'a b,c=d\\e "f" ünï'
    await store.write([reading("dev.1_x-2", BASE_US, {"t": 1.0}, device_type=odd_type)])
    ((measurement, tags), _, _, _) = next(fake.points())
    assert measurement == "iot_telemetry"
    assert dict(tags) == {"device_id": "dev.1_x-2", "device_type": odd_type}
    points = await store.query(SeriesQuery("dev.1_x-2", BASE_US, BASE_US + 1))
    assert points == [SeriesPoint("t", BASE_US, 1.0)]


async def test_a_device_id_cannot_inject_flux(store: InfluxTimeSeriesStore) -> None:
    now_us = time.time_ns() // 1000
    await store.write([reading("d1", now_us - SECOND_US, {"t": 1.0})])
    sneaky = 'a" or true or "'
    assert await store.query(SeriesQuery(sneaky, 0, now_us + HOUR_US)) == []
    assert await store.query(SeriesQuery("d1", 0, now_us + HOUR_US)) != []
    assert await store.latest([sneaky]) == {}


async def test_large_batches_are_sent_in_several_requests(
    store: InfluxTimeSeriesStore, fake: FakeInflux, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(influx_module, "MAX_LINES_PER_REQUEST", 3)
    await store.write([reading("d1", BASE_US + i, {"t": float(i)}) for i in range(7)])
    assert [write.lines for write in fake.writes] == [3, 3, 1]
    assert all(write.precision == "us" for write in fake.writes)
    assert fake.point_count() == 7


async def test_gzip_writes(fake: FakeInflux) -> None:
    store = make_store(fake, gzip=True)
    try:
        await store.write(window_readings())
    finally:
        await store.aclose()
    assert fake.writes[-1].gzip
    assert fake.point_count() == 8


# --- Refused reading sets --------------------------------------------------------------------


@pytest.mark.parametrize("conflict_status", [422, 400])
async def test_a_type_conflict_refuses_only_that_reading_set(conflict_status: int) -> None:
    async with FakeInflux(conflict_status=conflict_status) as fake:
        store = make_store(fake)
        try:
            await store.write([reading("d1", BASE_US, {"relay": 1.0})])
            batch = [
                reading("d1", BASE_US + i * SECOND_US, {"relay": float(i), "t": 20.0 + i})
                for i in range(1, 9)
            ]
            bad = reading("d2", BASE_US + 4500 * 1000, {"relay": True, "t": 0.0})
            batch.insert(4, bad)
            with pytest.raises(InfluxRejected) as caught:
                await store.write(batch)
            assert [rejected for rejected, _ in caught.value.rejected] == [bad]
            assert "field type conflict" in caught.value.rejected[0][1]
            assert caught.value.written == 8
            assert caught.value.details == [
                {"device_id": "d2", "epoch_us": bad.epoch_us, "reason": caught.value.rejected[0][1]}
            ]
            # Every other reading set was written; the refused one left nothing behind.
            relay = await store.query(
                SeriesQuery("d1", BASE_US, BASE_US + MINUTE_US, fields=["relay"])
            )
            assert [point.value for point in relay] == [1.0, *(float(i) for i in range(1, 9))]
            assert await store.query(SeriesQuery("d2", BASE_US, BASE_US + MINUTE_US)) == []
            # Halving finds one culprit among nine in a handful of requests, not nine.
            assert len(fake.writes) <= 1 + 1 + 2 * 4
        finally:
            await store.aclose()


async def test_every_refused_reading_set_is_reported_in_batch_order(
    store: InfluxTimeSeriesStore, fake: FakeInflux
) -> None:
    await store.write([reading("d1", BASE_US, {"on": True})])
    batch = [reading("d1", BASE_US + i, {"on": i % 2 == 1}) for i in range(1, 7)]
    batch[1] = reading("d1", BASE_US + 2, {"on": 2.0})
    batch[4] = reading("d1", BASE_US + 5, {"on": 5.0})
    with pytest.raises(InfluxRejected) as caught:
        await store.write(batch)
    refused = [rejected.epoch_us - BASE_US for rejected, _ in caught.value.rejected]
    assert refused == [2, 5]
    assert caught.value.written == 4
    assert fake.point_count() == 5


async def test_a_reading_set_line_protocol_cannot_carry_is_refused_before_sending(
    store: InfluxTimeSeriesStore, fake: FakeInflux
) -> None:
    bad = reading("d1", BASE_US, {"t": 1.0}, device_type="two\nlines")
    good = reading("d1", BASE_US + 1, {"t": 2.0})
    with pytest.raises(InfluxRejected) as caught:
        await store.write([bad, good])
    assert caught.value.rejected == [(bad, caught.value.rejected[0][1])]
    assert "line break" in caught.value.rejected[0][1]
    assert [write.lines for write in fake.writes] == [1]
    assert fake.point_count() == 1


# --- Unavailable -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 429])
async def test_an_overloaded_server_asks_to_retry_later(
    store: InfluxTimeSeriesStore, fake: FakeInflux, status: int
) -> None:
    fake.fail_next("write", status, retry_after="1")
    batch = window_readings()
    with pytest.raises(InfluxUnavailable) as caught:
        await store.write(batch)
    assert isinstance(caught.value, BackendUnavailable)
    assert caught.value.retry_after == 1.0
    assert caught.value.status == status
    assert fake.point_count() == 0
    await store.write(batch)  # the retry goes through
    assert fake.point_count() == 8


async def test_retry_after_may_be_an_http_date_and_may_be_absent(
    store: InfluxTimeSeriesStore, fake: FakeInflux
) -> None:
    fake.fail_next("write", 503, retry_after=email.utils.formatdate(time.time() + 30, usegmt=True))
    with pytest.raises(InfluxUnavailable) as caught:
        await store.write(window_readings())
    assert caught.value.retry_after is not None
    assert 25 <= caught.value.retry_after <= 31
    fake.fail_next("write", 500)
    with pytest.raises(InfluxUnavailable) as caught:
        await store.write(window_readings())
    assert caught.value.retry_after is None


async def test_a_query_on_an_overloaded_server_is_unavailable(
    store: InfluxTimeSeriesStore, fake: FakeInflux
) -> None:
    fake.fail_next("query", 503, retry_after="2")
    with pytest.raises(InfluxUnavailable) as caught:
        await store.query(SeriesQuery("d1", BASE_US, BASE_US + HOUR_US))
    assert caught.value.retry_after == 2.0


async def test_a_refused_token_is_unavailable_and_says_so(fake: FakeInflux) -> None:
    store = InfluxTimeSeriesStore(fake.url, "wrong-token", fake.org, fake.bucket)
    try:
        with pytest.raises(BackendUnavailable, match="token") as caught:
            await store.write(window_readings())
        assert not isinstance(caught.value, InfluxRejected)
        assert "IOTMETER_INFLUX_TOKEN" in caught.value.message
        with pytest.raises(BackendUnavailable, match="token"):
            await store.query(SeriesQuery("d1", BASE_US, BASE_US + HOUR_US))
        with pytest.raises(BackendUnavailable, match="token"):
            await store.latest(["d1"])
    finally:
        await store.aclose()
    assert fake.point_count() == 0


async def test_an_unknown_bucket_is_unavailable_and_names_the_setting(fake: FakeInflux) -> None:
    store = InfluxTimeSeriesStore(fake.url, fake.token, fake.org, "no-such-bucket")
    try:
        with pytest.raises(BackendUnavailable, match="IOTMETER_INFLUX_BUCKET"):
            await store.write(window_readings())
    finally:
        await store.aclose()


async def test_a_stopped_server_is_unavailable_until_it_is_back(
    store: InfluxTimeSeriesStore, fake: FakeInflux
) -> None:
    await fake.stop()
    with pytest.raises(BackendUnavailable, match="write failed"):
        await store.write(window_readings())
    with pytest.raises(BackendUnavailable, match="query failed"):
        await store.query(SeriesQuery("d1", BASE_US, BASE_US + HOUR_US))
    with pytest.raises(BackendUnavailable):
        await store.latest(["d1"])
    with pytest.raises(BackendUnavailable):
        await store.health()
    await fake.start()  # same port
    await store.write(window_readings())
    assert len(await store.query(SeriesQuery("d1", BASE_US, BASE_US + HOUR_US))) == 8


async def test_a_server_that_does_not_answer_times_out(fake: FakeInflux) -> None:
    store = make_store(fake, timeout=0.3)
    try:
        fake.delay_next("write", 5.0)
        started = time.monotonic()
        with pytest.raises(InfluxUnavailable, match=r"no answer within 0\.3 s"):
            await store.write(window_readings())
        fake.delay_next("query", 5.0)
        with pytest.raises(InfluxUnavailable):
            await store.query(SeriesQuery("d1", BASE_US, BASE_US + HOUR_US))
        assert time.monotonic() - started < 3.0
    finally:
        await store.aclose()


async def test_a_refused_query_is_not_reported_as_unavailable(
    store: InfluxTimeSeriesStore, fake: FakeInflux
) -> None:
    fake.fail_next("query", 400, message="error @4:6-4:40: something Flux dislikes", code="invalid")
    with pytest.raises(InfluxQueryFailed, match="something Flux dislikes") as caught:
        await store.query(SeriesQuery("d1", BASE_US, BASE_US + HOUR_US))
    assert not isinstance(caught.value, BackendUnavailable)


async def test_health_names_the_version(store: InfluxTimeSeriesStore, fake: FakeInflux) -> None:
    assert await store.health() == "influxdb v2.7.11"
    fake.fail_next("health", 503, message="storage is not ready")
    with pytest.raises(BackendUnavailable, match="storage is not ready"):
        await store.health()


# --- Settings --------------------------------------------------------------------------------


async def test_open_influx_store_from_settings(fake: FakeInflux, tmp_path: Path) -> None:
    settings = Settings(
        influx_url=fake.url,
        influx_token=fake.token,
        influx_org=fake.org,
        influx_bucket=fake.bucket,
        archive_dir=tmp_path,
    )
    async with open_influx_store(settings) as store:
        assert store.backend == "influxdb"
        await store.write(window_readings())
        assert len(await store.query(SeriesQuery("d1", BASE_US, BASE_US + HOUR_US))) == 8
    await store.aclose()  # closing twice is harmless
    with pytest.raises(SettingsInvalid, match="IOTMETER_INFLUX_URL"):
        async with open_influx_store(Settings(archive_dir=tmp_path)):
            pass
