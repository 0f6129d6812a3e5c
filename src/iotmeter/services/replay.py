"""Replay: re-ingest archived raw messages of a device into the time-series store.

The way to backfill after a schema change, a lost time range or an InfluxDB migration. Every
time-series write is keyed (device, field, time), so replaying twice changes nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import orjson

from iotmeter.db.engine import Database
from iotmeter.ingest.decode import DecodeLimits, decode_message
from iotmeter.readings import ReadingSet
from iotmeter.repositories.devices import DeviceRepository
from iotmeter.storage.archive.base import ArchiveStore
from iotmeter.storage.timeseries.base import TimeSeriesStore

PAGE = 500
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ReplayResult:
    messages: int
    readings: int
    refused: int


def _epoch_us_of(received_at: str) -> int:
    moment = datetime.fromisoformat(received_at.replace("Z", "+00:00"))
    return (moment - _EPOCH) // timedelta(microseconds=1)


def readings_of(body: bytes, limits: DecodeLimits) -> tuple[list[ReadingSet], int]:
    """Decode an archived document as the collector decoded the message it came from."""
    document = orjson.loads(body)
    payload = orjson.dumps(document["payload"])
    decoded = decode_message(
        payload, document["topic"], _epoch_us_of(document["received_at"]), limits
    )
    return list(decoded.readings), len(decoded.rejections)


async def replay_device(
    database: Database,
    archive: ArchiveStore,
    timeseries: TimeSeriesStore,
    device_id: str,
    start_us: int,
    stop_us: int,
    limits: DecodeLimits,
) -> ReplayResult:
    """Re-write the readings of every archived message of the device in [start, stop)."""
    async with database.transaction() as session:
        types = await DeviceRepository(session).types_of([device_id])
    device_type = types.get(device_id)
    messages = readings_total = refused = 0
    after: str | None = None
    while True:
        page = await archive.list(device_id, start_us, stop_us, limit=PAGE, after=after)
        documents = await asyncio.gather(*(archive.get(key) for key in page.keys))
        batch: list[ReadingSet] = []
        for document in documents:
            readings, rejected = readings_of(document.body, limits)
            refused += rejected
            batch.extend(
                reading if device_type is None else replace(reading, device_type=device_type)
                for reading in readings
            )
        if batch:
            await timeseries.write(batch)
        messages += len(documents)
        readings_total += len(batch)
        if page.next_cursor is None:
            return ReplayResult(messages, readings_total, refused)
        after = page.next_cursor
