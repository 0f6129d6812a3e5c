"""The archive sink of the per-message layout: one object per reading set."""

from __future__ import annotations

from collections import Counter

from iotmeter.ingest.batch import Batch
from iotmeter.ingest.directory import DeviceDirectory
from iotmeter.ingest.stats import IngestStats
from iotmeter.storage.archive.base import ArchiveStore


class ArchiveSink:
    name = "archive"

    def __init__(
        self, archive: ArchiveStore, directory: DeviceDirectory, stats: IngestStats
    ) -> None:
        self.archive = archive
        self.directory = directory
        self.stats = stats

    async def store(self, batch: Batch) -> int | None:
        readings = await self.directory.resolve(batch.readings, retype=False)
        if readings:
            await self.archive.put(readings)
        self.stats.count_stored(self.name, Counter(r.device_id for r in readings))
        return None

    async def idle(self) -> int | None:
        return None
