"""The MQTT collector: subscribe, decode, batch, and write each batch to both stores.

Two loops share a buffer: the receiver decodes messages as they arrive; the flusher takes
whatever has accumulated (at most `batch_max_messages`, or after `batch_max_delay_s`) and writes
it to the registry, the time-series store and the archive, retrying each until it succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import aiomqtt

from iotmeter.config import Settings
from iotmeter.db.engine import Database
from iotmeter.errors import BackendUnavailable
from iotmeter.ingest.broker import BrokerAddress
from iotmeter.ingest.decode import DecodeLimits, decode_message
from iotmeter.ingest.models import ReadingSet, Rejection, RejectReason
from iotmeter.ingest.stats import IngestStats
from iotmeter.repositories.dead_letters import DeadLetterRepository
from iotmeter.repositories.devices import DeviceRepository
from iotmeter.storage.archive.base import ArchiveStore
from iotmeter.storage.timeseries.base import TimeSeriesStore

logger = logging.getLogger(__name__)

TOPIC_FILTER = "iot/+/telemetry"
MAX_BACKOFF_S = 30.0
FINAL_FLUSH_TIMEOUT_S = 15.0
UNKNOWN_TYPE = "unknown"


@dataclass
class Batch:
    readings: list[ReadingSet] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.readings) + len(self.rejections)


class Backoff:
    """Capped exponential backoff that logs a state change once, not every retry."""

    def __init__(self, what: str, initial: float = 0.5, cap: float = MAX_BACKOFF_S) -> None:
        self.what = what
        self.initial = initial
        self.cap = cap
        self.delay = initial
        self.failing_since: float | None = None

    def failed(self, exc: BaseException, retry_after: float | None = None) -> float:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            logger.warning("%s failing, will retry until it works: %s", self.what, exc)
        else:
            logger.debug("%s still failing: %s", self.what, exc)
        wait = max(self.delay, retry_after or 0.0)
        self.delay = min(self.delay * 2, self.cap)
        return wait

    def succeeded(self) -> None:
        if self.failing_since is not None:
            logger.warning(
                "%s recovered after %.1f s", self.what, time.monotonic() - self.failing_since
            )
        self.failing_since = None
        self.delay = self.initial


class Collector:
    """Long-running task: `run()` until cancelled; survives broker and store outages."""

    def __init__(
        self,
        settings: Settings,
        broker: BrokerAddress,
        database: Database,
        timeseries: TimeSeriesStore,
        archive: ArchiveStore,
        stats: IngestStats,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.database = database
        self.timeseries = timeseries
        self.archive = archive
        self.stats = stats
        self.limits = DecodeLimits.from_settings(settings)
        self.connected = False
        self.last_error: str | None = None
        self._pending = Batch()
        self._has_data = asyncio.Event()
        self._batch_full = asyncio.Event()
        self._in_flight: Batch | None = None
        self._space = asyncio.Event()
        self._space.set()
        self._max_pending = settings.batch_max_messages * 10

    async def health(self) -> str:
        """For `/ready`: up while subscribed to the broker."""
        if not self.connected:
            raise BackendUnavailable(
                f"not connected to the {self.broker.describe()}: {self.last_error or 'connecting'}"
            )
        return f"subscribed to {TOPIC_FILTER} on the {self.broker.describe()}"

    async def run(self) -> None:
        flusher = asyncio.create_task(self._flush_loop(), name="collector-flush")
        try:
            await self._receive_loop()
        finally:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            # What was received (and acknowledged to the broker) must not be dropped on the
            # way out: write it, within a bound so shutdown cannot hang forever.
            # A batch the flusher was writing is written again: writes are keyed, so harmless.
            batch = self._pending
            if self._in_flight is not None:
                batch = Batch(
                    self._in_flight.readings + batch.readings,
                    self._in_flight.rejections + batch.rejections,
                )
            self._pending, self._in_flight = Batch(), None
            if len(batch):
                try:
                    await asyncio.wait_for(
                        asyncio.shield(self._write(batch)), FINAL_FLUSH_TIMEOUT_S
                    )
                except (TimeoutError, asyncio.CancelledError):
                    logger.error(
                        "shutdown: %d received reading sets could not be stored in time",
                        len(batch.readings),
                    )

    # --- receiving -------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        backoff = Backoff(f"MQTT connection to the {self.broker.describe()}")
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    username=self.broker.username,
                    password=self.broker.password,
                    identifier=self.settings.mqtt_client_id,
                    clean_session=False,
                    keepalive=30,
                    timeout=10,
                ) as client:
                    await client.subscribe(TOPIC_FILTER, qos=1)
                    self.connected = True
                    self.last_error = None
                    backoff.succeeded()
                    logger.info("collector subscribed to %s", TOPIC_FILTER)
                    async for message in client.messages:
                        await self._accept(message)
            except aiomqtt.MqttError as exc:
                self.connected = False
                self.last_error = str(exc)
                await asyncio.sleep(backoff.failed(exc))

    async def _accept(self, message: aiomqtt.Message) -> None:
        if len(self._pending) >= self._max_pending:
            self._space.clear()
            await self._space.wait()
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode()
        self.stats.message_received()
        decoded = decode_message(
            bytes(payload), message.topic.value, time.time_ns() // 1000, self.limits
        )
        self._pending.readings.extend(decoded.readings)
        self._pending.rejections.extend(decoded.rejections)
        self.stats.readings_received += len(decoded.readings)
        if len(self._pending):
            self._has_data.set()
            if len(self._pending) >= self.settings.batch_max_messages:
                self._batch_full.set()

    # --- flushing --------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await self._has_data.wait()
            if len(self._pending) < self.settings.batch_max_messages:
                # Give a partly filled batch the configured delay to fill up.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._batch_full.wait(), self.settings.batch_max_delay_s)
            batch, self._pending = self._pending, Batch()
            self._has_data.clear()
            self._batch_full.clear()
            self._space.set()
            self._in_flight = batch
            await self._write(batch)
            self._in_flight = None

    async def _write(self, batch: Batch) -> None:
        readings = await self._retry("registry database", self._register, batch)
        if readings:
            await asyncio.gather(
                self._retry_store("time-series store", self.timeseries.write, readings),
                self._retry_store("archive", self.archive.put, readings),
            )
            self.stats.count_stored(Counter(reading.device_id for reading in readings))

    async def _register(self, batch: Batch) -> list[ReadingSet]:
        """Register new devices (or refuse them), keep dead letters, move last_seen_at."""
        readings = batch.readings
        rejections = list(batch.rejections)
        async with self.database.transaction() as session:
            devices = DeviceRepository(session)
            types: dict[str, str] = {}
            seen: dict[str, int] = {}
            for reading in readings:
                types.setdefault(reading.device_id, reading.device_type or UNKNOWN_TYPE)
                seen[reading.device_id] = max(
                    seen.get(reading.device_id, 0), reading.received_at_us
                )
            registered = await devices.types_of(types)
            unknown = {
                device_id: kind for device_id, kind in types.items() if device_id not in registered
            }
            if unknown and self.settings.auto_register:
                await devices.register_missing(unknown)
                registered.update(unknown)
                logger.info(
                    "registered %d new device(s): %s",
                    len(unknown),
                    ", ".join(sorted(unknown)[:10]),
                )
            elif unknown:
                refused = [reading for reading in readings if reading.device_id in unknown]
                readings = [reading for reading in readings if reading.device_id not in unknown]
                rejections.extend(
                    Rejection(
                        reason=RejectReason.UNKNOWN_DEVICE,
                        detail=f"device {reading.device_id!r} is not registered and "
                        "auto-registration is off; register it with POST /api/v1/devices",
                        topic=reading.topic,
                        payload=reading.raw,
                        device_id=reading.device_id,
                        batch_index=reading.batch_index,
                    )
                    for reading in refused
                )
                for device_id in unknown:
                    seen.pop(device_id, None)
            # The stores see the registry's type, so a message without (or with another) `type`
            # cannot split a device's series in InfluxDB, where the type is a tag.
            readings = [
                reading
                if reading.device_type == registered[reading.device_id]
                else replace(reading, device_type=registered[reading.device_id])
                for reading in readings
            ]
            await DeadLetterRepository(session).add_many(rejections)
            await devices.touch_last_seen(
                {device_id: _from_epoch_us(epoch_us) for device_id, epoch_us in seen.items()}
            )
        for rejection in rejections:
            self.stats.count_rejection(rejection.reason.value, rejection.device_id)
        return readings

    async def _retry(
        self, what: str, action: Callable[[Batch], Awaitable[list[ReadingSet]]], batch: Batch
    ) -> list[ReadingSet]:
        backoff = Backoff(what)
        while True:
            try:
                result = await action(batch)
            except Exception as exc:  # every failure is retried: nothing received is dropped
                await asyncio.sleep(backoff.failed(exc))
                continue
            backoff.succeeded()
            return result

    async def _retry_store(
        self,
        what: str,
        write: Callable[[Sequence[ReadingSet]], Awaitable[None]],
        readings: Sequence[ReadingSet],
    ) -> None:
        backoff = Backoff(what)
        while True:
            try:
                await write(readings)
            except BackendUnavailable as exc:
                await asyncio.sleep(backoff.failed(exc, getattr(exc, "retry_after", None)))
                continue
            except Exception as exc:
                refused = getattr(exc, "rejected", None)
                if refused is None:
                    logger.exception("%s write failed unexpectedly; retrying", what)
                    await asyncio.sleep(backoff.failed(exc))
                    continue
                await self._dead_letter_refused(what, refused)
            backoff.succeeded()
            return

    async def _dead_letter_refused(
        self, what: str, refused: Sequence[tuple[ReadingSet, str]]
    ) -> None:
        """Records a store refuses for good go to the dead-letter store, not back in the loop."""
        rejections = [
            Rejection(
                reason=RejectReason.REFUSED_BY_STORE,
                detail=f"{what} refused it: {message}",
                topic=reading.topic,
                payload=reading.raw,
                device_id=reading.device_id,
                batch_index=reading.batch_index,
            )
            for reading, message in refused
        ]

        async def save(_batch: Batch) -> list[ReadingSet]:
            async with self.database.transaction() as session:
                await DeadLetterRepository(session).add_many(rejections)
            return []

        await self._retry("registry database", save, Batch())
        for rejection in rejections:
            self.stats.count_rejection(rejection.reason.value, rejection.device_id)


def _from_epoch_us(epoch_us: int) -> datetime:
    return datetime.fromtimestamp(epoch_us / 1_000_000, UTC)
