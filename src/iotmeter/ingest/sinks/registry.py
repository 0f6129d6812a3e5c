"""The registry sink: admits new devices (registers or refuses them, see `DeviceDirectory`),
keeps dead letters and moves `last_seen_at`, in one transaction per batch."""

from __future__ import annotations

from datetime import UTC, datetime

from iotmeter.config import env_name
from iotmeter.db.engine import Database
from iotmeter.ingest.batch import Batch
from iotmeter.ingest.directory import UNKNOWN_TYPE, DeviceDirectory
from iotmeter.ingest.stats import IngestStats
from iotmeter.readings import ReadingSet, Rejection, RejectReason
from iotmeter.repositories.dead_letters import DeadLetterRepository
from iotmeter.repositories.devices import DeviceRepository


def _from_epoch_us(epoch_us: int) -> datetime:
    return datetime.fromtimestamp(epoch_us / 1_000_000, UTC)


class RegistrySink:
    name = "registry"

    def __init__(self, database: Database, directory: DeviceDirectory, stats: IngestStats) -> None:
        self.database = database
        self.directory = directory
        self.stats = stats

    async def store(self, batch: Batch) -> int | None:
        readings = batch.readings
        rejections = list(batch.rejections)
        types: dict[str, str] = {}
        seen: dict[str, int] = {}
        for reading in readings:
            types.setdefault(reading.device_id, reading.device_type or UNKNOWN_TYPE)
            if reading.received_at_us > seen.get(reading.device_id, 0):
                seen[reading.device_id] = reading.received_at_us
        admission = await self.directory.admit(types, registrar=True)
        refused = admission.unknown | admission.over_limit
        if refused:
            rejections.extend(
                self._refusal(reading, admission.over_limit)
                for reading in readings
                if reading.device_id in refused
            )
            for device_id in refused:
                seen.pop(device_id, None)
        async with self.database.transaction() as session:
            await DeadLetterRepository(session).add_many(rejections)
            await DeviceRepository(session).touch_last_seen(
                {device_id: _from_epoch_us(epoch_us) for device_id, epoch_us in seen.items()}
            )
        self.stats.dead_letters_ingest += len(rejections)
        for rejection in rejections:
            self.stats.count_rejection(rejection.reason.value, rejection.device_id)
        return None

    async def idle(self) -> int | None:
        return None

    def _refusal(self, reading: ReadingSet, over_limit: set[str]) -> Rejection:
        if reading.device_id in over_limit:
            reason = RejectReason.DEVICE_LIMIT
            detail = (
                f"device {reading.device_id!r} is new and the registry holds "
                f"{self.directory.max_devices} devices, the most {env_name('max_devices')} "
                "allows; delete devices no longer used, or raise the limit"
            )
        else:
            reason = RejectReason.UNKNOWN_DEVICE
            detail = (
                f"device {reading.device_id!r} is not registered and "
                f"{env_name('auto_register')} is off; register it with POST /api/v1/devices"
            )
        return Rejection(
            reason=reason,
            detail=detail,
            topic=reading.topic,
            payload=reading.raw,
            device_id=reading.device_id,
            batch_index=reading.batch_index,
            received_at_us=reading.received_at_us,
        )
