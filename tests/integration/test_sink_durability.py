"""A sink confirms a spool position only once its write is durable (SIGKILL tests cannot see
this: the page cache survives a killed process, not a power cut). Each sink runs with its real
store; the test records the durability step of the store and the spool's confirm, in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import event, text

from iotmeter.db.engine import Database, build_engine
from iotmeter.db.migrate import upgrade_async
from iotmeter.ingest.batch import BatchDecoder
from iotmeter.ingest.decode import DecodeLimits
from iotmeter.ingest.directory import DeviceDirectory
from iotmeter.ingest.runner import SinkRunner
from iotmeter.ingest.sinks import Sink
from iotmeter.ingest.sinks.archive import ArchiveSink
from iotmeter.ingest.sinks.registry import RegistrySink
from iotmeter.ingest.sinks.segments import SegmentArchiveSink
from iotmeter.ingest.sinks.timeseries import TimeSeriesSink
from iotmeter.ingest.spool import Spool
from iotmeter.ingest.stats import IngestStats
from iotmeter.storage.archive import local as local_archive
from iotmeter.storage.archive.local import LocalArchiveStore
from iotmeter.storage.archive.segments import LayeredArchive
from iotmeter.storage.timeseries.sql import SqlTimeSeriesStore

COUNT = 120


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite+aiosqlite:///{tmp_path}/iotmeter.db"
    await upgrade_async(url)
    database = Database(build_engine(url))
    yield database
    await database.close()


def build(kind: str, database: Database, tmp_path: Path) -> Sink:
    stats = IngestStats()
    directory = DeviceDirectory(database, auto_register=True)
    archive = LayeredArchive(LocalArchiveStore(tmp_path / "archive"), lookback_us=10**12)
    if kind == "registry":
        return RegistrySink(database, directory, stats)
    if kind == "timeseries":
        return TimeSeriesSink(SqlTimeSeriesStore(database), directory, stats)
    if kind == "archive":
        return ArchiveSink(archive, directory, stats)
    return SegmentArchiveSink(
        archive,
        directory,
        stats,
        intent_path=tmp_path / "archive-epoch",
        max_age_s=0.2,
        quiet_s=0.0,
        buffer_bytes=1 << 20,
        segment_max_bytes=1 << 20,
        gzip=False,
    )


@pytest.mark.parametrize("kind", ["registry", "timeseries", "archive", "segments"])
async def test_every_confirm_follows_the_durability_step_of_its_store(
    kind: str, database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []

    # The durability steps: a committed SQLite transaction (with synchronous=FULL, checked
    # below), and the archive's make_durable (syncfs, or fsync of each file and folder).
    event.listen(database.engine.sync_engine, "commit", lambda _c: events.append("durable"))
    real_make_durable = local_archive.make_durable

    def recording_make_durable(root: Path, folders: Any) -> None:
        real_make_durable(root, folders)
        events.append("durable")

    monkeypatch.setattr(local_archive, "make_durable", recording_make_durable)

    sink = build(kind, database, tmp_path)
    spool = Spool(tmp_path / "spool", [sink.name])
    spool.open()
    real_confirm = spool.confirm

    async def recording_confirm(consumer: str, seq: int) -> None:
        events.append(f"confirm {seq}")
        await real_confirm(consumer, seq)

    monkeypatch.setattr(spool, "confirm", recording_confirm)
    for index in range(COUNT):
        payload = orjson.dumps({"ts": 1_795_000_000_000 + index, "metrics": {"t": index}})
        spool.append(f"iot/dur-{index % 3}/telemetry", payload, 1_795_000_000_000_000 + index)
        if index % 40 == 39:
            await spool.commit()
    runner = SinkRunner(
        sink,
        spool,
        BatchDecoder(DecodeLimits(), consumers=1),
        park=_no_parking,
        batch_max=40,
        batch_delay_s=0.01,
        progress=asyncio.Event(),
    )
    task = asyncio.create_task(runner.run())
    try:
        for _ in range(200):
            if spool.confirmed[sink.name] == COUNT - 1:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        spool.close()
    assert spool.confirmed[sink.name] == COUNT - 1
    confirms = [index for index, name in enumerate(events) if name.startswith("confirm")]
    assert confirms
    previous = -1
    for index in confirms:
        assert "durable" in events[previous + 1 : index], f"a confirm without durability: {events}"
        previous = index

    async with database.engine.connect() as connection:
        synchronous = (await connection.execute(text("PRAGMA synchronous"))).scalar()
    assert synchronous == 2  # FULL: a commit is on disk when it returns


async def _no_parking(sink: str, dead: list[Any]) -> None:
    raise AssertionError(f"nothing should be parked here ({sink}: {dead})")
