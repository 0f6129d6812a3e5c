"""The registry sink: registers new devices (or refuses them), keeps dead letters, moves
`last_seen_at`, all in one transaction per batch."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from iotmeter.config import env_name
from iotmeter.db.engine import Database
from iotmeter.ingest.batch import Batch
from iotmeter.ingest.directory import UNKNOWN_TYPE, DeviceDirectory
from iotmeter.ingest.stats import IngestStats
from iotmeter.readings import Rejection, RejectReason
from iotmeter.repositories.dead_letters import DeadLetterRepository
from iotmeter.repositories.devices import DeviceRepository

logger = logging.getLogger(__name__)


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
        async with self.database.transaction() as session:
            devices = DeviceRepository(session)
            registered = await devices.types_of(types)
            unknown = {
                device_id: kind for device_id, kind in types.items() if device_id not in registered
            }
            if unknown and self.directory.auto_register:
                await devices.register_missing(unknown)
                registered.update(unknown)
                logger.info(
                    "registered %d new device(s): %s", len(unknown), ", ".join(sorted(unknown)[:5])
                )
            elif unknown:
                rejections.extend(
                    Rejection(
                        reason=RejectReason.UNKNOWN_DEVICE,
                        detail=f"device {reading.device_id!r} is not registered and "
                        f"{env_name('auto_register')} is off; register it with "
                        "POST /api/v1/devices",
                        topic=reading.topic,
                        payload=reading.raw,
                        device_id=reading.device_id,
                        batch_index=reading.batch_index,
                        received_at_us=reading.received_at_us,
                    )
                    for reading in readings
                    if reading.device_id in unknown
                )
                for device_id in unknown:
                    seen.pop(device_id, None)
            await DeadLetterRepository(session).add_many(rejections)
            await devices.touch_last_seen(
                {device_id: _from_epoch_us(epoch_us) for device_id, epoch_us in seen.items()}
            )
        self.directory.learn(registered)
        for rejection in rejections:
            self.stats.count_rejection(rejection.reason.value, rejection.device_id)
        return None

    async def idle(self) -> int | None:
        return None
