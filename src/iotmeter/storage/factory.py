"""The one place that reads the settings and picks each store's backend."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from iotmeter.config import Settings
from iotmeter.db.engine import Database
from iotmeter.storage.archive.segments import LayeredArchive
from iotmeter.storage.timeseries.base import TimeSeriesStore


@contextlib.asynccontextmanager
async def open_timeseries(settings: Settings, database: Database) -> AsyncIterator[TimeSeriesStore]:
    """InfluxDB 2.x when `IOTMETER_INFLUX_URL` is set, else the SQL store in the registry DB."""
    if settings.influx_url:
        from iotmeter.storage.timeseries.influx import open_influx_store

        async with open_influx_store(settings) as influx:
            yield influx
        return
    from iotmeter.storage.timeseries.partitions import DAY_US as day_us
    from iotmeter.storage.timeseries.sql import Lifecycle, SqlTimeSeriesStore

    lifecycle = Lifecycle(
        retention_us=int(settings.telemetry_retention_days * day_us) or None,
        rollup_retention_us=int(settings.rollup_retention_days * day_us) or None,
        rollups=settings.rollups_enabled,
        compaction=settings.compaction_enabled,
        partitions_ahead=settings.telemetry_partitions_ahead,
    )
    yield SqlTimeSeriesStore(database, lifecycle=lifecycle)


@contextlib.asynccontextmanager
async def open_archive(settings: Settings) -> AsyncIterator[LayeredArchive]:
    """S3 when `IOTMETER_S3_ENDPOINT_URL` is set, else the local folder archive; read in
    both layouts (per-message objects and segments) whichever one writes."""
    lookback_us = int(settings.archive_segment_lookback_s * 1_000_000)
    if settings.s3_endpoint_url:
        from iotmeter.storage.archive.s3 import open_s3_store

        async with open_s3_store(settings) as s3:
            yield LayeredArchive(s3, lookback_us=lookback_us)
        return
    from iotmeter.storage.archive.local import LocalArchiveStore

    yield LayeredArchive(LocalArchiveStore(settings.archive_dir), lookback_us=lookback_us)
