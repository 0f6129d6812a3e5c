"""The collector: the intake, the spool and one runner per sink, wired; health and counters.

    broker ──▶ intake ──append──▶ spool ──read──▶ runner[sink] ──store──▶ sink ──▶ store
       ▲          │                 │ commit (fsync)     │ retry, lag, park      │
       └─ PUBACK ─┘◀── committed ───┘                    └──── confirm ◀─────────┘

A QoS 1 message is acknowledged only once it is durable in the spool; each sink drains the
spool from its own confirmed position; a segment of the spool is freed once every sink has
confirmed it. One slow or failing sink never holds up the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from pathlib import Path

from iotmeter.config import Settings, env_name
from iotmeter.db.engine import Database, is_unavailable, unavailable
from iotmeter.errors import BackendUnavailable
from iotmeter.ingest.batch import BatchDecoder
from iotmeter.ingest.broker import BrokerAddress
from iotmeter.ingest.decode import DecodeLimits
from iotmeter.ingest.directory import DeviceDirectory
from iotmeter.ingest.intake import Intake
from iotmeter.ingest.live import Publisher
from iotmeter.ingest.runner import SinkRunner
from iotmeter.ingest.series import SeriesGuard
from iotmeter.ingest.sinks import Sink
from iotmeter.ingest.sinks.archive import ArchiveSink
from iotmeter.ingest.sinks.registry import RegistrySink
from iotmeter.ingest.sinks.segments import SegmentArchiveSink
from iotmeter.ingest.sinks.timeseries import TimeSeriesSink
from iotmeter.ingest.spool import Spool
from iotmeter.ingest.stats import IngestStats
from iotmeter.readings import Rejection
from iotmeter.repositories.dead_letters import DeadLetterRepository
from iotmeter.storage.archive.segments import LayeredArchive
from iotmeter.storage.timeseries.base import TimeSeriesStore

logger = logging.getLogger(__name__)

CLIENT_ID_FILE = "mqtt-client-id"


def build_sinks(
    settings: Settings,
    database: Database,
    timeseries: TimeSeriesStore,
    archive: LayeredArchive,
    directory: DeviceDirectory,
    stats: IngestStats,
    series: SeriesGuard | None = None,
    alerts: Sink | None = None,
    live: Publisher | None = None,
) -> list[Sink]:
    """Every sink the collector feeds, in the order they are listed in `/ready`."""
    archive_sink: Sink
    if settings.archive_layout == "segment":
        archive_sink = SegmentArchiveSink(
            archive,
            directory,
            stats,
            intent_path=settings.spool_dir / "archive-epoch",
            max_age_s=settings.archive_segment_max_age_s,
            quiet_s=settings.archive_segment_quiet_s,
            buffer_bytes=settings.archive_segment_buffer_bytes,
            segment_max_bytes=settings.archive_segment_max_bytes,
            gzip=settings.archive_segment_gzip,
        )
    else:
        archive_sink = ArchiveSink(archive, directory, stats)
    sinks: list[Sink] = [
        RegistrySink(database, directory, stats),
        TimeSeriesSink(timeseries, directory, stats, series, live),
        archive_sink,
    ]
    if alerts is not None:
        sinks.append(alerts)
    return sinks


def client_id_for(spool_dir: Path) -> str:
    """The collector's MQTT client id when none is configured: made once per spool folder
    (from the host and the folder) and kept beside the spool, so that two iotmeters on one
    broker never share a session, and one iotmeter keeps its session across restarts."""
    path = spool_dir / CLIENT_ID_FILE
    try:
        stored = path.read_text().strip()
    except FileNotFoundError:
        stored = ""
    if stored:
        return stored
    place = f"{socket.gethostname()}:{spool_dir.resolve()}"
    client_id = f"iotmeter-{hashlib.sha256(place.encode()).hexdigest()[:12]}"
    spool_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(client_id + "\n")
    os.replace(temporary, path)
    return client_id


class Collector:
    """Long-running task: `run()` until cancelled; survives broker and store outages."""

    def __init__(
        self,
        settings: Settings,
        broker: BrokerAddress,
        database: Database,
        spool: Spool,
        sinks: list[Sink],
        stats: IngestStats,
        *,
        client_id: str,
    ) -> None:
        self.settings = settings
        self.database = database
        self.spool = spool
        self.stats = stats
        self.progress = asyncio.Event()
        decoder = BatchDecoder(DecodeLimits.from_settings(settings), consumers=len(sinks))
        self.runners = [
            SinkRunner(
                sink,
                spool,
                decoder,
                self.park,
                batch_max=settings.batch_max_messages,
                batch_delay_s=settings.batch_max_delay_s,
                progress=self.progress,
            )
            for sink in sinks
        ]
        self.intake = Intake(settings, broker, spool, client_id=client_id, stats=stats, flow=self)

    @classmethod
    async def open(
        cls,
        settings: Settings,
        broker: BrokerAddress,
        database: Database,
        sinks: list[Sink],
        stats: IngestStats,
    ) -> Collector:
        """A collector with its spool opened (recovered); `close()` it when done."""
        spool = Spool(
            settings.spool_dir,
            [sink.name for sink in sinks],
            max_bytes=settings.spool_max_bytes,
            segment_bytes=settings.spool_segment_bytes,
            memory_bytes=settings.spool_memory_bytes,
        )
        await asyncio.to_thread(spool.open)
        client_id = settings.mqtt_client_id
        try:
            if client_id is None:
                client_id = await asyncio.to_thread(client_id_for, settings.spool_dir)
        except BaseException:
            spool.close()
            raise
        return cls(settings, broker, database, spool, sinks, stats, client_id=client_id)

    def close(self) -> None:
        self.spool.close()

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.intake.run(), name="collector-intake")
            for runner in self.runners:
                group.create_task(runner.run(), name=f"collector-{runner.name}")

    def behind(self, head: int, limit: int) -> bool:
        """For the intake: whether a working sink lags `head` by more than `limit` records."""
        return any(runner.working() and head - runner.taken > limit for runner in self.runners)

    async def park(self, sink: str, dead: list[Rejection]) -> None:
        """Keep records a sink could not take in the dead letters (keyed per sink)."""
        try:
            async with self.database.transaction() as session:
                await DeadLetterRepository(session).add_many(dead, scope=sink)
        except Exception as exc:
            if is_unavailable(exc):
                raise unavailable(exc) from exc
            raise
        for rejection in dead:
            self.stats.count_rejection(rejection.reason.value, rejection.device_id)

    # --- observing ----------------------------------------------------------------------------

    async def health(self) -> str:
        """For `/ready`: the broker connection and the spool's intake."""
        return await self.intake.health()

    async def spool_health(self) -> str:
        """For `/ready`: the spool and the sinks draining it."""
        detail = f"depth {self.spool.depth()}, lag {self.spool.lag()}"
        failing = {runner.name: runner.error for runner in self.runners if runner.error}
        if failing:
            raise BackendUnavailable(f"sink(s) failing, retrying: {failing}; {detail}")
        stall_s = self.settings.sink_stall_s
        stalled = {
            runner.name: round(runner.stalled_for())
            for runner in self.runners
            if runner.stalled_for() > stall_s
        }
        if stalled:
            raise BackendUnavailable(
                f"sink(s) made no progress with records waiting for more than {stall_s:g} s "
                f"({env_name('sink_stall_s')}): {stalled}; {detail}"
            )
        damage = self.spool.damage_report()
        if damage is not None:
            raise BackendUnavailable(damage)
        return detail

    @property
    def failing_sinks(self) -> dict[str, str]:
        return {runner.name: runner.error for runner in self.runners if runner.error}
