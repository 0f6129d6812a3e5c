"""The time-series sink: every reading of registered devices, tagged with the registry's type
where the store keeps it."""

from __future__ import annotations

from collections import Counter

from iotmeter.errors import StoreRejected
from iotmeter.ingest.batch import Batch
from iotmeter.ingest.directory import DeviceDirectory
from iotmeter.ingest.live import Publisher
from iotmeter.ingest.series import SeriesGuard
from iotmeter.ingest.stats import IngestStats
from iotmeter.readings import ReadingSet
from iotmeter.storage.timeseries.base import TimeSeriesStore


class TimeSeriesSink:
    name = "timeseries"

    def __init__(
        self,
        store: TimeSeriesStore,
        directory: DeviceDirectory,
        stats: IngestStats,
        series: SeriesGuard | None = None,
        live: Publisher | None = None,
    ) -> None:
        self.timeseries = store
        self.directory = directory
        self.stats = stats
        self.series = series
        self.live = live

    async def store(self, batch: Batch) -> int | None:
        readings = await self.directory.resolve(
            batch.readings, retype=self.timeseries.tags_device_type
        )
        over_limit: list[tuple[ReadingSet, str]] = []
        if self.series is not None and readings:
            readings, over_limit = await self.series.check(readings)
        if readings:
            try:
                await self.timeseries.write(readings)
            except StoreRejected as exc:
                refused = {id(reading) for reading, _reason in exc.rejected}
                stored = [reading for reading in readings if id(reading) not in refused]
                self.stats.count_stored(self.name, Counter(r.device_id for r in stored))
                if self.live is not None:
                    self.live(stored)
                exc.over_limit.extend(over_limit)
                raise
            self.stats.count_stored(self.name, Counter(r.device_id for r in readings))
            if self.live is not None:
                self.live(readings)
        if over_limit:
            raise StoreRejected(
                f"{len(over_limit)} reading set(s) over the limit on new series",
                [],
                over_limit=over_limit,
            )
        return None

    async def idle(self) -> int | None:
        return None
