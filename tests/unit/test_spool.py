"""The write-ahead spool on a real filesystem: durability, recovery, per-sink positions, limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotmeter.ingest.spool import Spool, SpoolRecord, encode_record

SINKS = ["registry", "timeseries", "archive"]


def open_spool(directory: Path, **options: int) -> Spool:
    spool = Spool(directory, SINKS, **options)  # type: ignore[arg-type]
    spool.open()
    return spool


async def fill(spool: Spool, count: int, start: int = 0) -> None:
    for index in range(start, start + count):
        spool.append(f"iot/d{index % 3}/telemetry", b'{"n": %d}' % index, 1_000_000 + index)
    await spool.commit()


async def read_all(spool: Spool, after: int) -> list[SpoolRecord]:
    records: list[SpoolRecord] = []
    while True:
        chunks = await spool.read(after, 1000)
        if not chunks:
            return records
        for chunk in chunks:
            records.extend(chunk.records)
        after = records[-1].seq


async def test_committed_records_survive_a_restart_in_order(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    await fill(spool, 250)
    spool.close()  # no clean shutdown protocol: what is committed is on disk
    reopened = open_spool(tmp_path)
    records = await read_all(reopened, -1)
    assert [record.seq for record in records] == list(range(250))
    assert records[7] == SpoolRecord(7, 1_000_007, "iot/d1/telemetry", b'{"n": 7}')
    assert reopened.depth() == 250


async def test_appended_but_uncommitted_records_are_not_visible(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    await fill(spool, 3)
    spool.append("iot/x/telemetry", b"{}", 1)
    assert [record.seq for record in await read_all(spool, -1)] == [0, 1, 2]
    spool.close()
    # Never committed, never acked: after a crash it is simply not there (the broker resends).
    assert [record.seq for record in await read_all(open_spool(tmp_path), -1)] == [0, 1, 2]


async def test_a_torn_tail_is_cut_off_at_the_last_intact_record(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    await fill(spool, 10)
    spool.close()
    segment = next(tmp_path.glob("*.log"))
    torn = encode_record(SpoolRecord(10, 5, "iot/t/telemetry", b"partial"))[:-3]
    with segment.open("ab") as handle:
        handle.write(torn)
    reopened = open_spool(tmp_path)
    assert [record.seq for record in await read_all(reopened, -1)] == list(range(10))
    await fill(reopened, 2, start=10)
    assert [record.seq for record in await read_all(reopened, 9)] == [10, 11]


async def test_each_sink_resumes_from_its_own_confirmed_position(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    await fill(spool, 100)
    await spool.confirm("registry", 99)
    await spool.confirm("timeseries", 59)
    await spool.confirm("archive", 9)
    spool.close()
    reopened = open_spool(tmp_path)
    assert reopened.confirmed == {"registry": 99, "timeseries": 59, "archive": 9}
    assert reopened.lag() == {"registry": 0, "timeseries": 40, "archive": 90}
    assert reopened.depth() == 90
    assert next(r.seq for r in await read_all(reopened, reopened.confirmed["archive"])) == 10
    # New records continue the sequence after a restart.
    await fill(reopened, 1)
    assert reopened.committed_seq == 100


async def test_segments_are_freed_only_when_every_sink_has_confirmed_them(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, segment_bytes=1 << 16)
    for round_ in range(10):
        await fill(spool, 500, start=round_ * 500)
    segments = len(list(tmp_path.glob("*.log")))
    assert segments > 3
    await spool.confirm("registry", 4999)
    await spool.confirm("timeseries", 4999)
    assert len(list(tmp_path.glob("*.log"))) == segments  # the archive still needs them
    await spool.confirm("archive", 2499)
    remaining = len(list(tmp_path.glob("*.log")))
    assert 1 <= remaining < segments
    assert [r.seq for r in await read_all(spool, 2499)] == list(range(2500, 5000))
    await spool.confirm("archive", 4999)
    assert spool.depth() == 0
    assert spool.disk_bytes <= 1 << 16


async def test_the_spool_reports_full_at_its_disk_limit(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    while not spool.full:
        await fill(spool, 200)
    assert spool.disk_bytes >= 1 << 20
    for sink in SINKS:
        await spool.confirm(sink, spool.committed_seq)
    assert not spool.full


async def test_reads_behind_the_memory_window_come_from_disk(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, memory_bytes=1 << 20)
    for round_ in range(30):
        await fill(spool, 1000, start=round_ * 1000)  # ~30 MB of records, 1 MB in memory
    records = await read_all(spool, -1)
    assert [record.seq for record in records] == list(range(30_000))


async def test_oldest_unconfirmed_age_follows_the_slowest_sink(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    assert spool.oldest_unconfirmed_age_s() is None
    spool.append("iot/a/telemetry", b"{}", 1_000_000)  # received long ago (epoch + 1 s)
    await spool.commit()
    age = spool.oldest_unconfirmed_age_s()
    assert age is not None
    assert age > 1e9
    for sink in SINKS:
        await spool.confirm(sink, 0)
    assert spool.oldest_unconfirmed_age_s() is None


@pytest.mark.parametrize("payload", [b"", b"\x00\xff" * 1000, "é🙂".encode()])
async def test_any_payload_bytes_round_trip(tmp_path: Path, payload: bytes) -> None:
    spool = open_spool(tmp_path)
    spool.append("iot/ü/telemetry", payload, 42)
    await spool.commit()
    spool.close()
    (record,) = await read_all(open_spool(tmp_path), -1)
    assert (record.topic, record.payload, record.received_at_us) == ("iot/ü/telemetry", payload, 42)
