"""The spool never loses a committed record to damage it can read past, and never hides damage.

Bytes are flipped in real segment and cursor files; the spool is reopened as after a crash.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from pathlib import Path

import pytest

from iotmeter.ingest import spool_files as spool_module
from iotmeter.ingest.spool import Spool, SpoolInUse, SpoolRecord
from iotmeter.ingest.spool_records import FILE_HEADER, encode_record
from tests.unit.test_spool import read_all

SINKS = ["registry", "timeseries", "archive"]


def open_spool(directory: Path, **options: int) -> Spool:
    spool = Spool(directory, SINKS, **options)  # type: ignore[arg-type]
    spool.open()
    return spool


async def fill(spool: Spool, count: int, start: int = 0, size: int = 40) -> None:
    for index in range(start, start + count):
        body = b'{"n": %d, "pad": "%s"}' % (index, b"x" * size)
        spool.append(f"iot/d{index % 3}/telemetry", body, 1_000_000 + index)
        if index % 100 == 99:
            await spool.commit()
    await spool.commit()


def segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.log"), key=lambda path: int(path.stem))


def offset_of(path: Path, seq: int) -> int:
    """The byte offset of record `seq` in a segment (found through its encoding's magic)."""
    data = path.read_bytes()
    position = len(FILE_HEADER)
    while position < len(data):
        length, record_seq = struct.unpack_from("<IQ", data, position + 4)
        if record_seq == seq:
            return position
        position += 24 + length
    raise AssertionError(f"record {seq} not in {path}")


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


async def test_a_flipped_byte_mid_segment_loses_only_that_record(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    await fill(spool, 300)
    spool.close()
    (segment,) = segments(tmp_path)
    flip(segment, offset_of(segment, 150) + 40)  # inside the body of record 150
    reopened = open_spool(tmp_path)
    seqs = [record.seq for record in await read_all(reopened, -1)]
    assert seqs == [*range(150), *range(151, 300)]
    assert reopened.committed_seq == 299
    assert reopened.quarantine.records_lost == 1
    report = reopened.damage_report()
    assert report is not None
    assert "1 record(s) lost" in report
    (kept,) = list((tmp_path / "quarantine").glob("*.bin"))
    assert kept.stat().st_size > 0
    # New records continue after the old ones, and are read too.
    await fill(reopened, 5, start=300)
    assert [record.seq for record in await read_all(reopened, 298)] == list(range(299, 305))


async def test_a_flipped_length_is_caught_by_the_header_checksum(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    await fill(spool, 50)
    spool.close()
    (segment,) = segments(tmp_path)
    flip(segment, offset_of(segment, 20) + 6)  # the length field's third byte: a huge length
    reopened = open_spool(tmp_path)
    assert [r.seq for r in await read_all(reopened, -1)] == [*range(20), *range(21, 50)]
    assert reopened.damage_report() is not None


async def test_a_damaged_first_record_of_an_older_segment_keeps_the_segment(
    tmp_path: Path,
) -> None:
    spool = open_spool(tmp_path, segment_bytes=1 << 14)
    await fill(spool, 1000)
    spool.close()
    files = segments(tmp_path)
    assert len(files) > 3
    older = files[1]
    first = int(older.stem)
    flip(older, len(FILE_HEADER) + 30)
    reopened = open_spool(tmp_path, segment_bytes=1 << 14)
    assert older.exists(), "a damaged segment must never be deleted at open"
    seqs = [record.seq for record in await read_all(reopened, -1)]
    assert seqs == [seq for seq in range(1000) if seq != first]
    assert reopened.quarantine.records_lost == 1
    assert reopened.damage_report() is not None


async def test_damage_in_the_last_committed_record_is_reported_not_cut_silently(
    tmp_path: Path,
) -> None:
    spool = open_spool(tmp_path)
    await fill(spool, 30)
    spool.close()
    (segment,) = segments(tmp_path)
    size = segment.stat().st_size
    flip(segment, size - 5)  # the last record is whole, but its body changed
    reopened = open_spool(tmp_path)
    assert [r.seq for r in await read_all(reopened, -1)] == list(range(29))
    assert reopened.damage_report() is not None
    assert len(list((tmp_path / "quarantine").glob("*.bin"))) == 1


@pytest.mark.parametrize("cut", ["header", "body", "zeros"])
async def test_a_torn_tail_is_cut_quietly(tmp_path: Path, cut: str) -> None:
    spool = open_spool(tmp_path)
    await fill(spool, 10)
    spool.close()
    (segment,) = segments(tmp_path)
    record = encode_record(SpoolRecord(10, 5, "iot/t/telemetry", b"partial" * 10))
    tail = {"header": record[:10], "body": record[:-7], "zeros": bytes(4096)}[cut]
    with segment.open("ab") as handle:
        handle.write(tail)
    reopened = open_spool(tmp_path)
    assert [r.seq for r in await read_all(reopened, -1)] == list(range(10))
    assert reopened.damage_report() is None
    await fill(reopened, 2, start=10)
    reopened.close()
    again = open_spool(tmp_path)
    assert [r.seq for r in await read_all(again, -1)] == list(range(12))


async def test_a_damaged_cursor_replays_that_sink_from_the_start(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    await fill(spool, 100)
    for sink in SINKS:
        await spool.confirm(sink, 79)
    spool.close()
    cursor = tmp_path / "timeseries.cursor"
    text = cursor.read_text()
    assert text.startswith("79 ")
    cursor.write_text("99" + text[2:])  # a digit changed: the checksum no longer matches
    reopened = open_spool(tmp_path)
    assert reopened.confirmed["timeseries"] == -1
    assert reopened.confirmed["registry"] == 79
    assert reopened.cursor_resets == ["timeseries"]
    assert len(await read_all(reopened, reopened.confirmed["timeseries"])) == 100


async def test_a_cursor_of_the_first_format_is_still_read(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    await fill(spool, 10)
    spool.close()
    (tmp_path / "archive.cursor").write_text("4")
    assert open_spool(tmp_path).confirmed["archive"] == 4


async def test_records_larger_than_any_read_block_are_read_whole(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    await fill(spool, 5)
    big = bytes(range(256)) * (10 * 4096 + 7)  # ~10 MB
    spool.append("iot/big/telemetry", big, 7)
    await fill(spool, 5, start=6)
    spool.close()
    reopened = open_spool(tmp_path, memory_bytes=1 << 20)
    records = await read_all(reopened, -1)
    assert [record.seq for record in records] == list(range(11))
    assert records[5].payload == big


async def test_a_segment_of_the_first_format_is_still_read(tmp_path: Path) -> None:
    def legacy_record(seq: int, payload: bytes) -> bytes:
        topic = b"iot/old/telemetry"
        body = struct.pack("<QQH", seq, 1_000 + seq, len(topic)) + topic + payload
        return struct.pack("<II", len(body), zlib.crc32(body)) + body

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / f"{0:020d}.log").write_bytes(b"".join(legacy_record(n, b"{}") for n in range(5)))
    spool = open_spool(tmp_path)
    await fill(spool, 3, start=5)
    records = await read_all(spool, -1)
    assert [record.seq for record in records] == list(range(8))
    assert records[0].topic == "iot/old/telemetry"
    assert len(segments(tmp_path)) == 2  # new records go to a segment of the new format


async def test_a_second_process_cannot_open_the_same_spool(tmp_path: Path) -> None:
    first = open_spool(tmp_path)
    with pytest.raises(SpoolInUse, match="IOTMETER_SPOOL_DIR"):
        open_spool(tmp_path)
    first.close()
    open_spool(tmp_path).close()


async def test_cancelling_a_wait_raises_cancelled_error(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    waiter = asyncio.create_task(spool.wait_beyond(0, within=30))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # The spool still works for other waiters.
    other = asyncio.create_task(spool.wait_beyond(-1, within=5))
    await fill(spool, 1)
    await asyncio.wait_for(other, 1)


async def test_a_failed_write_leaves_no_half_group_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(tmp_path)
    await fill(spool, 10)
    real_write = spool_module.os.write
    calls = 0

    def failing_write(descriptor: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            real_write(descriptor, bytes(data)[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return real_write(descriptor, data)

    monkeypatch.setattr(spool_module.os, "write", failing_write)
    for index in range(10, 20):
        spool.append("iot/d/telemetry", b"{}", index)
    with pytest.raises(OSError, match="No space"):
        await spool.commit()
    assert spool.committed_seq == 9
    assert spool.pending == 10  # kept for the next commit
    await spool.commit()
    monkeypatch.undo()
    spool.close()
    reopened = open_spool(tmp_path)
    assert [r.seq for r in await read_all(reopened, -1)] == list(range(20))
    assert reopened.damage_report() is None
