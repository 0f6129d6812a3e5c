"""The write-ahead spool: received MQTT messages, durable on local disk before they are acked.

Records are appended to segment files and made durable in groups (one fsync per commit, many
records). Each sink (time series, archive, registry) reads the spool from its own position and
confirms what it has stored; a segment is deleted only when every sink has confirmed all of it.
After a crash, the sinks resume from their confirmed positions: nothing the broker was told is
stored can be lost, and what is replayed is harmless because every write downstream is keyed.

Record layout (little endian): length u32 (of what follows the CRC), crc32 u32, seq u64,
received_at_us u64, topic length u16, topic bytes, payload bytes.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from iotmeter.errors import IotmeterError

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
_BODY_HEAD = struct.Struct("<QQH")
_SEGMENT_SUFFIX = ".log"
_CURSOR_SUFFIX = ".cursor"


class SpoolCorrupt(IotmeterError):
    code = "spool_corrupt"


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    seq: int
    received_at_us: int
    topic: str
    payload: bytes


@dataclass(slots=True)
class Chunk:
    """Consecutive records (one commit group, or one read from disk), shared by the sinks."""

    records: list[SpoolRecord]
    nbytes: int = 0
    cache: dict[str, object] = field(default_factory=dict)
    """Per-chunk memo (the decoded readings), so the sinks decode each message once."""

    @property
    def first_seq(self) -> int:
        return self.records[0].seq

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq


def _last_seq(chunk: Chunk) -> int:
    return chunk.records[-1].seq


def encode_record(record: SpoolRecord) -> bytes:
    topic = record.topic.encode()
    body = _BODY_HEAD.pack(record.seq, record.received_at_us, len(topic)) + topic + record.payload
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


_READ_BLOCK = 4 << 20  # larger than any record (payloads are bounded far below this)


def _record_size(record: SpoolRecord) -> int:
    return _HEADER.size + _BODY_HEAD.size + len(record.topic.encode()) + len(record.payload)


def _decode_records(data: bytes, limit: int | None = None) -> tuple[list[SpoolRecord], int]:
    """Records in `data` (at most `limit`) and the offset after the last one decoded (a torn
    tail is ignored)."""
    records: list[SpoolRecord] = []
    offset = 0
    end = len(data)
    while offset + _HEADER.size <= end and (limit is None or len(records) < limit):
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        if length < _BODY_HEAD.size or start + length > end:
            break
        body = data[start : start + length]
        if zlib.crc32(body) != crc:
            break
        seq, received_at_us, topic_length = _BODY_HEAD.unpack_from(body)
        topic_end = _BODY_HEAD.size + topic_length
        records.append(
            SpoolRecord(
                seq, received_at_us, body[_BODY_HEAD.size : topic_end].decode(), body[topic_end:]
            )
        )
        offset = start + length
    return records, offset


@dataclass
class _Segment:
    first_seq: int
    path: Path
    size: int = 0
    last_seq: int = -1


class Spool:
    """Append, commit (fsync), read from a position, confirm per consumer, free segments."""

    def __init__(
        self,
        directory: Path,
        consumers: list[str],
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 32 << 20,
        memory_bytes: int = 64 << 20,
        fsync: bool = True,
    ) -> None:
        self.directory = directory
        self.consumers = list(consumers)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.memory_bytes = memory_bytes
        self.fsync = fsync
        self._segments: list[_Segment] = []
        self._file: int | None = None
        self._pending: list[SpoolRecord] = []
        self._pending_bytes = bytearray()
        self._disk_bytes = 0
        # After-seq -> (segment, byte offset) where a disk read of that position stopped.
        self._read_hints: dict[int, tuple[int, int]] = {}
        self._next_seq = 0
        self.committed_seq = -1
        self.confirmed: dict[str, int] = {}
        # Recently committed chunks, for sinks reading near the head (no disk reads).
        # Ordered by seq; a list so a read finds its start by bisection, not by a scan.
        self._recent: list[Chunk] = []
        self._recent_bytes = 0
        self._committed = asyncio.Condition()
        self._commit_lock = asyncio.Lock()
        # (last seq, receive time of its first record) per commit not yet confirmed by all.
        self._unconfirmed: deque[tuple[int, int]] = deque()

    # --- opening and recovery -----------------------------------------------------------------

    def open(self) -> None:
        """Recover the segments and the consumers' positions (blocking; call at start-up)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for consumer in self.consumers:
            self.confirmed[consumer] = self._read_cursor(consumer)
        paths = sorted(self.directory.glob(f"*{_SEGMENT_SUFFIX}"))
        for path in paths:
            self._segments.append(_Segment(int(path.stem), path, path.stat().st_size))
        if self._segments:
            last = self._segments[-1]
            data = last.path.read_bytes()
            records, good = _decode_records(data)
            if good < len(data):
                logger.warning(
                    "spool: dropping a torn tail of %d bytes in %s (written, never committed)",
                    len(data) - good,
                    last.path.name,
                )
                with open(last.path, "r+b") as handle:
                    handle.truncate(good)
                last.size = good
            last.last_seq = records[-1].seq if records else last.first_seq - 1
            for segment in self._segments[:-1]:
                segment.last_seq = self._last_seq_of(segment)
            self._next_seq = max(last.last_seq + 1, last.first_seq)
        floor = min(self.confirmed.values(), default=-1)
        self._next_seq = max(self._next_seq, floor + 1)
        self.committed_seq = self._next_seq - 1
        self._free_segments()
        self._disk_bytes = self.disk_bytes
        if self.committed_seq > floor:
            first = self._read_disk(floor, 1)
            if first:
                self._unconfirmed.append((self.committed_seq, first[0].received_at_us))
        logger.info(
            "spool at %s: %d segment(s), %d record(s) not yet confirmed by every sink",
            self.directory,
            len(self._segments),
            self.committed_seq - min(self.confirmed.values(), default=self.committed_seq),
        )

    def _last_seq_of(self, segment: _Segment) -> int:
        records, _ = _decode_records(segment.path.read_bytes())
        return records[-1].seq if records else segment.first_seq - 1

    def _cursor_path(self, consumer: str) -> Path:
        return self.directory / f"{consumer}{_CURSOR_SUFFIX}"

    def _read_cursor(self, consumer: str) -> int:
        try:
            return int(self._cursor_path(consumer).read_text().strip())
        except (FileNotFoundError, ValueError):
            return -1

    # --- writing ------------------------------------------------------------------------------

    @property
    def disk_bytes(self) -> int:
        return sum(segment.size for segment in self._segments)

    @property
    def full(self) -> bool:
        # Checked per message: the committed size is summed once per commit, not here.
        return self._disk_bytes + len(self._pending_bytes) >= self.max_bytes

    def append(self, topic: str, payload: bytes, received_at_us: int) -> int:
        """Buffer one message; it is durable (and may be acked) once `commit()` returns its seq."""
        record = SpoolRecord(self._next_seq, received_at_us, topic, payload)
        self._next_seq += 1
        self._pending.append(record)
        self._pending_bytes += encode_record(record)
        return record.seq

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def memory_first_seq(self) -> int:
        """The first record a sink can still read from memory (later ones: all of them)."""
        return self._recent[0].first_seq if self._recent else self.committed_seq + 1

    async def commit(self) -> int:
        """Write and fsync what was appended; returns the last committed seq."""
        async with self._commit_lock:
            if not self._pending:
                return self.committed_seq
            records, data = self._pending, bytes(self._pending_bytes)
            self._pending, self._pending_bytes = [], bytearray()
            await asyncio.to_thread(self._write, records[0].seq, records[-1].seq, data)
            chunk = Chunk(records, len(data))
            self._recent.append(chunk)
            self._recent_bytes += len(data)
            dropped = 0
            while dropped < len(self._recent) and self._recent_bytes > self.memory_bytes:
                self._recent_bytes -= self._recent[dropped].nbytes
                dropped += 1
            if dropped:
                del self._recent[:dropped]
            self._unconfirmed.append((records[-1].seq, records[0].received_at_us))
            self.committed_seq = records[-1].seq
            self._disk_bytes = self.disk_bytes
            async with self._committed:
                self._committed.notify_all()
            return self.committed_seq

    def _write(self, first_seq: int, last_seq: int, data: bytes) -> None:
        if not self._segments or self._segments[-1].size >= self.segment_bytes:
            if self._file is not None:
                os.close(self._file)
                self._file = None
            path = self.directory / f"{first_seq:020d}{_SEGMENT_SUFFIX}"
            self._segments.append(_Segment(first_seq, path))
        segment = self._segments[-1]
        if self._file is None:
            self._file = os.open(segment.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._sync_directory()
        os.write(self._file, data)
        if self.fsync:
            os.fdatasync(self._file)
        segment.size += len(data)
        segment.last_seq = last_seq

    def _sync_directory(self) -> None:
        if not self.fsync:
            return
        handle = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)

    # --- reading ------------------------------------------------------------------------------

    async def wait_beyond(self, seq: int, *, within: float) -> None:
        """Return once a record after `seq` is committed, or after `within` seconds."""
        if self.committed_seq > seq:
            return
        async with self._committed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._committed.wait_for(lambda: self.committed_seq > seq), within
                )

    async def read(self, after: int, max_records: int) -> list[Chunk]:
        """Committed chunks holding the records after `after` (at least one record, if any)."""
        if self.committed_seq <= after:
            return []
        chunks: list[Chunk] = []
        count = 0
        if self._recent and self._recent[0].first_seq <= after + 1:
            start = bisect.bisect_right(self._recent, after, key=_last_seq)
            for chunk in itertools.islice(self._recent, start, None):
                if chunk.first_seq <= after:
                    chunk = Chunk([r for r in chunk.records if r.seq > after])
                chunks.append(chunk)
                count += len(chunk.records)
                if count >= max_records:
                    break
            return chunks
        # Behind the in-memory window (a slow sink, or after a restart): read from disk.
        records = await asyncio.to_thread(self._read_disk, after, max_records)
        return [Chunk(records)] if records else []

    def _read_disk(self, after: int, max_records: int) -> list[SpoolRecord]:
        """Records after `after`, read in bounded blocks from where the previous read of this
        position stopped (a lagging sink reads each segment once, not once per batch)."""
        out: list[SpoolRecord] = []
        for segment in list(self._segments):
            if segment.last_seq <= after:
                continue
            hint = self._read_hints.pop(after, None)
            offset = hint[1] if hint is not None and hint[0] == segment.first_seq else 0
            try:
                with open(segment.path, "rb") as handle:
                    while len(out) < max_records:
                        handle.seek(offset)
                        block = handle.read(_READ_BLOCK)
                        records, used = _decode_records(block, max_records - len(out))
                        if not records:
                            break
                        end = offset
                        for record in records:
                            end += _record_size(record)
                            if record.seq > self.committed_seq:
                                return out
                            if record.seq > after:
                                out.append(record)
                                if len(out) >= max_records:
                                    break
                        offset = end if len(out) >= max_records else offset + used
                        if len(out) >= max_records:
                            if len(self._read_hints) > 64:
                                self._read_hints.clear()
                            self._read_hints[out[-1].seq] = (segment.first_seq, end)
                            return out
            except FileNotFoundError:
                continue
        return out

    # --- confirming ---------------------------------------------------------------------------

    async def confirm(self, consumer: str, seq: int) -> None:
        """The consumer has stored everything up to `seq`; persist that, free what all have."""
        if seq <= self.confirmed[consumer]:
            return
        self.confirmed[consumer] = seq
        await asyncio.to_thread(self._write_cursor, consumer, seq)
        floor = min(self.confirmed.values())
        while self._unconfirmed and self._unconfirmed[0][0] <= floor:
            self._unconfirmed.popleft()
        if self._segments and self._segments[0].last_seq <= floor:
            await asyncio.to_thread(self._free_segments)
            self._disk_bytes = self.disk_bytes

    def _write_cursor(self, consumer: str, seq: int) -> None:
        path = self._cursor_path(consumer)
        temporary = path.with_suffix(".tmp")
        with open(temporary, "w") as handle:
            handle.write(str(seq))
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())
        os.replace(temporary, path)

    def _free_segments(self) -> None:
        floor = min(self.confirmed.values(), default=-1)
        # Never delete the segment being written.
        while len(self._segments) > 1 and self._segments[0].last_seq <= floor:
            segment = self._segments.pop(0)
            segment.path.unlink(missing_ok=True)
        if (
            len(self._segments) == 1
            and self._segments[0].last_seq <= floor
            and self._segments[0].size >= self.segment_bytes
        ):
            # The only segment is full and fully confirmed: start afresh on next write.
            if self._file is not None:
                os.close(self._file)
                self._file = None
            self._segments.pop(0).path.unlink(missing_ok=True)

    # --- observing ----------------------------------------------------------------------------

    def depth(self) -> int:
        """Records committed but not yet confirmed by every consumer."""
        return self.committed_seq - min(self.confirmed.values(), default=self.committed_seq)

    def oldest_unconfirmed_age_s(self) -> float | None:
        """Seconds since the oldest record not yet confirmed by every sink was received."""
        if self.depth() <= 0 or not self._unconfirmed:
            return None
        return max(0.0, time.time() - self._unconfirmed[0][1] / 1e6)

    def lag(self) -> dict[str, int]:
        return {name: self.committed_seq - seq for name, seq in self.confirmed.items()}

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def iter_segment_paths(self) -> Iterator[Path]:
        return (segment.path for segment in self._segments)
