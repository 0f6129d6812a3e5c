"""InfluxDB retention: the bucket made (or checked) at open, and the store's usage figures.

Against the fake InfluxDB 2.x (no real one can run here); `test_influx_live.py` creates a bucket
with a retention period on a real server when one is configured.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from iotmeter.config import Settings
from iotmeter.errors import BackendUnavailable
from iotmeter.storage.timeseries.base import SeriesQuery
from iotmeter.storage.timeseries.influx import (
    InfluxTimeSeriesStore,
    cli_duration,
    open_influx_store,
    retention_seconds,
)
from tests.fixtures.fake_influx import FakeInflux
from tests.fixtures.readings import HOUR_US, SECOND_US, reading

BASE_US = 1_714_521_600_000_000  # 2024-05-01T00:00:00Z
DAY_S = 86_400
LOGGER = "iotmeter.storage.timeseries.influx"


def influx_settings(fake: FakeInflux, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "influx_url": fake.url,
        "influx_token": fake.token,
        "influx_org": fake.org,
        "influx_bucket": fake.bucket,
        "archive_dir": tmp_path,
    }
    values.update(overrides)
    return Settings(**values)


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == LOGGER and record.levelno >= level
    ]


async def writes_and_reads(store: InfluxTimeSeriesStore) -> None:
    await store.write([reading("d1", BASE_US, {"t": 1.5})])
    points = await store.query(SeriesQuery("d1", BASE_US, BASE_US + HOUR_US))
    assert [point.value for point in points] == [1.5]


@pytest.fixture(autouse=True)
def capture_store_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)


# --- A missing bucket is created ------------------------------------------------------------


async def test_a_missing_bucket_is_created_with_the_retention_setting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeInflux(bucket_exists=False) as fake:
        settings = influx_settings(fake, tmp_path, telemetry_retention_days=30)
        async with open_influx_store(settings) as store:
            assert fake.bucket_retention() == 30 * DAY_S
            assert store.retention_s == 30 * DAY_S
            await writes_and_reads(store)
        created = [body for method, body in fake.bucket_requests if method == "POST"]
        assert created == [
            {
                "orgID": fake.org_id,
                "name": fake.bucket,
                "retentionRules": [{"type": "expire", "everySeconds": 30 * DAY_S}],
                "description": "iotmeter readings",
            }
        ]
    assert messages(caplog) == []
    assert any("created the bucket" in line for line in messages(caplog, logging.INFO))


async def test_retention_zero_creates_a_bucket_that_keeps_data_forever(tmp_path: Path) -> None:
    async with FakeInflux(bucket_exists=False) as fake:
        async with open_influx_store(influx_settings(fake, tmp_path)) as store:
            await writes_and_reads(store)
        assert fake.bucket_retention() == 0
        ((_, body),) = [request for request in fake.bucket_requests if request[0] == "POST"]
        assert body["retentionRules"] == []


async def test_a_retention_under_an_hour_creates_a_one_hour_bucket_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeInflux(bucket_exists=False) as fake:
        settings = influx_settings(fake, tmp_path, telemetry_retention_days=0.01)
        async with open_influx_store(settings):
            pass
        assert fake.bucket_retention() == 3600
    assert any(
        "IOTMETER_TELEMETRY_RETENTION_DAYS=0.01" in line and "one hour" in line
        for line in messages(caplog)
    )


# --- An existing bucket is left alone -------------------------------------------------------


async def test_an_existing_bucket_with_another_retention_is_not_changed_and_the_log_says_how(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeInflux(bucket_retention_s=7 * DAY_S) as fake:
        bucket_id = fake.buckets[fake.bucket]["id"]
        settings = influx_settings(fake, tmp_path, telemetry_retention_days=30)
        async with open_influx_store(settings) as store:
            assert store.retention_s == 7 * DAY_S
            await writes_and_reads(store)
        assert fake.bucket_retention() == 7 * DAY_S
        assert [method for method, _ in fake.bucket_requests] == ["GET"]
        assert fake.bucket_requests[0][1] == {"name": fake.bucket, "org": fake.org}
    (warning,) = messages(caplog)
    assert "keeps data for 7 days" in warning
    assert "IOTMETER_TELEMETRY_RETENTION_DAYS=30 asks to keep it for 30 days" in warning
    assert "does not change an existing bucket's retention" in warning
    assert f"influx bucket update --id {bucket_id} --retention 30d" in warning


async def test_a_bucket_kept_forever_differs_from_a_retention_setting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeInflux() as fake:
        store = InfluxTimeSeriesStore(fake.url, fake.token, fake.org, fake.bucket)
        try:
            assert await store.ensure_bucket(1.5) == "differs"
            assert await store.ensure_bucket(0) == "matches"
        finally:
            await store.aclose()
        assert fake.bucket_retention() == 0
    (warning,) = messages(caplog)
    assert "keeps data forever" in warning
    assert "--retention 36h" in warning


async def test_an_existing_bucket_with_the_same_retention_logs_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeInflux(bucket_retention_s=30 * DAY_S) as fake:
        settings = influx_settings(fake, tmp_path, telemetry_retention_days=30)
        async with open_influx_store(settings) as store:
            await writes_and_reads(store)
    assert messages(caplog) == []


# --- Tokens that may not, servers that are down ---------------------------------------------


async def test_a_token_that_may_not_create_buckets_gets_a_clear_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeInflux(bucket_exists=False, may_create_buckets=False) as fake:
        settings = influx_settings(fake, tmp_path, telemetry_retention_days=30)
        async with open_influx_store(settings) as store:
            assert store.retention_s is None
            # Nothing to write to: the write names the setting to check.
            with pytest.raises(BackendUnavailable, match="IOTMETER_INFLUX_BUCKET"):
                await store.write([reading("d1", BASE_US, {"t": 1.0})])
        assert fake.buckets == {}
    (warning,) = messages(caplog)
    assert "may not create it (HTTP 401" in warning
    assert f"influx bucket create --name {fake.bucket} --org {fake.org} --retention 30d" in warning


async def test_a_token_that_may_only_write_still_stores_readings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # InfluxDB lists only the buckets a token may read: this one sees none and may not create.
    async with FakeInflux(may_list_buckets=False, may_create_buckets=False) as fake:
        settings = influx_settings(fake, tmp_path, telemetry_retention_days=30)
        async with open_influx_store(settings) as store:
            await writes_and_reads(store)
        assert fake.bucket_retention() == 0
    (warning,) = messages(caplog)
    assert "If the bucket exists, readings are written as usual" in warning


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_bucket_lookup_is_logged_and_the_store_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    async with FakeInflux() as fake:
        fake.fail_next("buckets", status, code="unauthorized", message="read:buckets denied")
        async with open_influx_store(influx_settings(fake, tmp_path)) as store:
            await writes_and_reads(store)
        assert [method for method, _ in fake.bucket_requests] == ["GET"]
    (warning,) = messages(caplog)
    assert f"the token may not list buckets (HTTP {status})" in warning
    assert "neither checks nor sets the bucket's retention" in warning


async def test_a_bucket_made_meanwhile_by_someone_else_is_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeInflux(may_list_buckets=False) as fake:
        store = InfluxTimeSeriesStore(fake.url, fake.token, fake.org, fake.bucket)
        try:
            assert await store.ensure_bucket(30) == "unchecked"
            await writes_and_reads(store)
        finally:
            await store.aclose()
        assert fake.bucket_retention() == 0
    assert messages(caplog) == []
    assert any("already exists" in line for line in messages(caplog, logging.INFO))


async def test_influxdb_down_at_start_up_does_not_stop_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeInflux() as fake:
        settings = influx_settings(fake, tmp_path, telemetry_retention_days=30)
        await fake.stop()
        async with open_influx_store(settings, request_timeout_s=2.0) as store:
            (warning,) = messages(caplog)
            assert "the bucket and its retention were not checked at start-up" in warning
            await fake.start()  # same port
            await writes_and_reads(store)


async def test_an_unknown_org_is_named_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeInflux() as fake:
        settings = influx_settings(fake, tmp_path, influx_org="no-such-org")
        async with open_influx_store(settings):
            pass
    (warning,) = messages(caplog)
    assert 'organization name "no-such-org" not found' in warning
    assert "IOTMETER_INFLUX_ORG" in warning


# --- usage() ---------------------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeInflux]:
    async with FakeInflux(bucket_retention_s=30 * DAY_S) as server:
        yield server


async def test_usage_of_an_empty_bucket(fake: FakeInflux) -> None:
    store = InfluxTimeSeriesStore(fake.url, fake.token, fake.org, fake.bucket)
    try:
        usage = await store.usage()
    finally:
        await store.aclose()
    assert usage.oldest_us is None
    assert usage.bytes_used is None
    assert usage.detail == "InfluxDB's OSS API does not report a bucket's size"


async def test_usage_gives_the_oldest_reading_over_float_and_boolean_series(
    fake: FakeInflux, tmp_path: Path
) -> None:
    async with open_influx_store(influx_settings(fake, tmp_path)) as store:
        await store.write(
            [
                reading("d1", BASE_US + 10 * SECOND_US, {"t": 1.0, "on": True}),
                reading("d2", BASE_US + 5 * SECOND_US, {"on": False}),
                reading("d2", BASE_US + 50 * SECOND_US, {"t": 2.0}),
                reading("d3", BASE_US + HOUR_US, {"t": 3}),
            ]
        )
        usage = await store.usage()
        assert usage.oldest_us == BASE_US + 5 * SECOND_US
        assert usage.bytes_used is None
        assert usage.detail is not None
        assert "does not report a bucket's size" in usage.detail
        assert "the bucket keeps data for 30 days" in usage.detail
        # One bounded query: the first point of each series, then one row.
        flux = fake.queries[-1]
        assert "first()" in flux
        assert flux.rstrip().endswith('min(column: "_time")')


async def test_usage_counts_only_the_store_measurement(fake: FakeInflux) -> None:
    other = InfluxTimeSeriesStore(
        fake.url, fake.token, fake.org, fake.bucket, measurement="something_else"
    )
    store = InfluxTimeSeriesStore(fake.url, fake.token, fake.org, fake.bucket)
    try:
        await other.write([reading("d1", BASE_US - HOUR_US, {"t": 0.0})])
        await store.write([reading("d1", BASE_US, {"t": 1.0})])
        assert (await store.usage()).oldest_us == BASE_US
    finally:
        await other.aclose()
        await store.aclose()


async def test_usage_of_a_stopped_server_is_unavailable(fake: FakeInflux) -> None:
    store = InfluxTimeSeriesStore(fake.url, fake.token, fake.org, fake.bucket, timeout=2.0)
    try:
        await fake.stop()
        with pytest.raises(BackendUnavailable):
            await store.usage()
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("days", "seconds", "cli"),
    [(0, 0, "0"), (30, 30 * DAY_S, "30d"), (1.5, 36 * 3600, "36h"), (0.001, 3600, "1h")],
)
def test_retention_days_as_bucket_seconds_and_cli_duration(
    days: float, seconds: int, cli: str
) -> None:
    assert retention_seconds(days) == seconds
    assert cli_duration(seconds) == cli
