"""The write-ahead spool: received MQTT messages, durable on local disk before they are acked.

Records are appended to segment files and made durable in groups (one fdatasync per commit, many
records). Each sink reads the spool from its own position and confirms what it has stored; a
segment is deleted only when every sink has confirmed all of it. After a crash, the sinks resume
from their confirmed positions: nothing the broker was told is stored can be lost, and what is
replayed is harmless because every write downstream is keyed.

What the spool does not trust (see `spool_records` for the format):
- A record is read by its declared length, whatever its size, and checked against its CRCs.
- At start-up, bytes after the last good record of the newest segment that are the start of an
  unfinished append are a *torn tail* (never committed, never acked): cut off with a warning.
  Any other damage is *corruption of committed data*: its bytes are copied to `quarantine/`,
  the error is logged and counted and shown by `/ready`, and reading goes on with the next
  record that checks out. Nothing is deleted without a word.
- A cursor file carries a checksum; a damaged one replays the spool for that sink from its start
  (harmless: keyed writes), loudly.
- One process at a time: the folder is locked (`LOCK`), a second iotmeter on it fails to start.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import itertools
import logging
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from iotmeter.config import env_name
from iotmeter.errors import SettingsInvalid
from iotmeter.ingest.spool_records import (
    FILE_HEADER,
    Damage,
    Located,
    SpoolRecord,
    encode_record,
    first_offset,
    is_legacy,
    scan,
)

logger = logging.getLogger(__name__)

__all__ = ["Chunk", "Spool", "SpoolInUse", "SpoolRecord", "encode_record"]

_SEGMENT_SUFFIX = ".log"
_CURSOR_SUFFIX = ".cursor"
_INDEX_EVERY = 256
"""Records between two entries of a segment's in-memory index (where a disk read starts)."""


class SpoolInUse(SettingsInvalid):
    """Another process holds the spool folder."""


@dataclass(slots=True)
class Chunk:
    """Consecutive records (one commit group, or one read from disk), shared by the sinks."""

    records: list[SpoolRecord]
    nbytes: int = 0
    cache: dict[str, object] = field(default_factory=dict)
    """Per-chunk memo (the decoded messages), so the sinks decode each message once."""

    @property
    def first_seq(self) -> int:
        return self.records[0].seq

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq


def _last_seq(chunk: Chunk) -> int:
    return chunk.records[-1].seq


@dataclass(slots=True)
class _Segment:
    first_seq: int
    path: Path
    size: int = 0
    """Bytes that hold committed records (for the newest segment: where the next append goes)."""
    last_seq: int = -1
    legacy: bool = False
    index: list[tuple[int, int]] = field(default_factory=list)
    """(seq, offset) of some records, ascending: where a read of a later seq may start."""


class _Quarantine:
    """Damaged spool bytes, copied aside once, reported every time they are met."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.spans = 0
        self.bytes = 0
        self.records_lost = 0
        self.last_event: str | None = None
        self._seen: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def files(self) -> list[Path]:
        try:
            return sorted(self.folder.glob("*.bin"))
        except OSError:
            return []

    def keep(self, segment: _Segment, damage: Damage, before: int, after: int | None) -> None:
        """Copy `damage` aside and report it; `before`/`after` are the seqs around it."""
        with self._lock:
            if (segment.path.name, damage.start) in self._seen:
                return
            self._seen.add((segment.path.name, damage.start))
        lost = "an unknown number of" if after is None else str(max(0, after - before - 1))
        target = self.folder / f"{segment.path.stem}@{damage.start}.bin"
        try:
            self.folder.mkdir(exist_ok=True)
            if not target.exists():
                with open(segment.path, "rb") as source:
                    source.seek(damage.start)
                    target.write_bytes(source.read(damage.end - damage.start))
        except OSError as exc:
            logger.error("spool: cannot copy damaged bytes to %s: %s", target, exc)
        with self._lock:
            self.spans += 1
            self.bytes += damage.end - damage.start
            if after is not None:
                self.records_lost += max(0, after - before - 1)
            self.last_event = (
                f"{damage.end - damage.start} corrupt byte(s) at offset {damage.start} of "
                f"{segment.path.name} (after record {before}: {lost} record(s) lost), "
                f"copied to {target}"
            )
        logger.error(
            "spool: committed data is damaged: %s; reading goes on after it. Check the disk; "
            "delete the file from %s once you have looked at it.",
            self.last_event,
            self.folder,
        )


def _cursor_text(seq: int) -> str:
    return f"{seq} {zlib.crc32(str(seq).encode()):08x}\n"


def _parse_cursor(text: str) -> int | None:
    """The seq of a cursor file, or None when it is damaged. (`seq` alone: format 1.)"""
    parts = text.split()
    try:
        if len(parts) == 1:
            return int(parts[0])
        if len(parts) == 2 and int(parts[1], 16) == zlib.crc32(parts[0].encode()):
            return int(parts[0])
    except ValueError:
        return None
    return None


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
        self.quarantine = _Quarantine(directory / "quarantine")
        self.cursor_resets: list[str] = []
        # The writer thread, the thread that frees segments and the readers share these.
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._file: int | None = None
        self._lock_file: int | None = None
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
        self._advanced = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        # (last seq, receive time of its first record) per commit not yet confirmed by all.
        self._unconfirmed: deque[tuple[int, int]] = deque()

    # --- opening and recovery -----------------------------------------------------------------

    def open(self) -> None:
        """Lock the folder, recover segments and positions (blocking; call at start-up)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_folder()
        paths = sorted(
            (path for path in self.directory.glob(f"*{_SEGMENT_SUFFIX}") if path.stem.isdigit()),
            key=lambda path: int(path.stem),
        )
        for path in paths:
            self._segments.append(_Segment(int(path.stem), path, path.stat().st_size))
        for older, newer in itertools.pairwise(self._segments):
            older.last_seq = newer.first_seq - 1
            with open(older.path, "rb") as handle:
                older.legacy = is_legacy(handle)
        if self._segments:
            self._recover_newest(self._segments[-1])
        cursors = {consumer: self._read_cursor(consumer) for consumer in self.consumers}
        known = [seq for seq in cursors.values() if seq is not None]
        if self._segments:
            newest = self._segments[-1]
            self._next_seq = max(newest.last_seq + 1, newest.first_seq)
        # A cursor past the newest record (records lost to damage) must not be reused.
        self._next_seq = max(self._next_seq, max(known, default=-1) + 1)
        self.committed_seq = self._next_seq - 1
        start = self._segments[0].first_seq - 1 if self._segments else self.committed_seq
        for consumer, seq in cursors.items():
            if seq is None:
                self.cursor_resets.append(consumer)
                logger.error(
                    "spool: the cursor of sink %s is damaged; it reads the spool again from "
                    "record %d (already stored records are written again, harmlessly)",
                    consumer,
                    start + 1,
                )
                seq = start
            self.confirmed[consumer] = min(seq, self.committed_seq)
        self._free_segments()
        self._disk_bytes = self.disk_bytes
        if self.committed_seq > self.floor:
            first = self._read_disk(self.floor, 1)
            if first:
                self._unconfirmed.append((self.committed_seq, first[0].received_at_us))
        logger.info(
            "spool at %s: %d segment(s), %d record(s) not yet confirmed by every sink",
            self.directory,
            len(self._segments),
            self.depth(),
        )

    def _lock_folder(self) -> None:
        descriptor = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise SpoolInUse(
                f"the spool folder {self.directory} is in use by another iotmeter process; "
                f"give each process its own {env_name('spool_dir')}"
            ) from None
        self._lock_file = descriptor

    def _recover_newest(self, segment: _Segment) -> None:
        """Find where the newest segment's good records end; cut a torn tail, quarantine
        corruption."""
        with open(segment.path, "r+b") as handle:
            segment.legacy = is_legacy(handle)
            if not segment.legacy and segment.size < len(FILE_HEADER):
                handle.truncate(0)  # created, header not yet written: nothing in it
                handle.write(FILE_HEADER)
                segment.size = len(FILE_HEADER)
            last = segment.first_seq - 1
            cut: int | None = None
            damage_before: tuple[Damage, int] | None = None
            for item in scan(
                handle,
                first_offset(segment.legacy),
                segment.size,
                legacy=segment.legacy,
                after_seq=last,
                at_end_of_log=True,
            ):
                if isinstance(item, Damage):
                    if item.kind == "torn":
                        logger.warning(
                            "spool: cutting a torn tail of %d bytes off %s (an append cut short "
                            "by a crash: never committed, never acked)",
                            item.end - item.start,
                            segment.path.name,
                        )
                        cut = item.start
                    elif item.end >= segment.size:
                        self.quarantine.keep(segment, item, last, None)
                        cut = item.start
                    else:
                        damage_before = (item, last)
                    continue
                if damage_before is not None:
                    self.quarantine.keep(
                        segment, damage_before[0], damage_before[1], item.record.seq
                    )
                    damage_before = None
                self._index(segment, item)
                last = item.record.seq
            if cut is not None:
                handle.truncate(cut)
                segment.size = cut
            segment.last_seq = last

    @staticmethod
    def _index(segment: _Segment, item: Located) -> None:
        if not segment.index or item.record.seq >= segment.index[-1][0] + _INDEX_EVERY:
            segment.index.append((item.record.seq, item.offset))

    def _cursor_path(self, consumer: str) -> Path:
        return self.directory / f"{consumer}{_CURSOR_SUFFIX}"

    def _read_cursor(self, consumer: str) -> int | None:
        """The consumer's confirmed seq; -1 when it has none; None when the file is damaged."""
        try:
            text = self._cursor_path(consumer).read_text(errors="replace")
        except FileNotFoundError:
            return -1
        return _parse_cursor(text)

    # --- writing ------------------------------------------------------------------------------

    @property
    def disk_bytes(self) -> int:
        return sum(segment.size for segment in self._segments)

    @property
    def full(self) -> bool:
        # Checked per message: the committed size is summed once per commit, not here.
        return self._disk_bytes + len(self._pending_bytes) >= self.max_bytes

    @property
    def floor(self) -> int:
        """The last seq every consumer has confirmed."""
        return min(self.confirmed.values(), default=self.committed_seq)

    def append(
        self,
        topic: str,
        payload: bytes,
        received_at_us: int,
        *,
        payload_size: int | None = None,
        payload_sha256: bytes | None = None,
    ) -> int:
        """Buffer one message; it is durable (and may be acked) once `commit()` returns its seq.

        For a payload too large to keep, pass its head with the whole `payload_size` and
        `payload_sha256`: the decoder refuses it, and the dead letter keeps the head."""
        record = SpoolRecord(
            self._next_seq, received_at_us, topic, payload, payload_size, payload_sha256
        )
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
        """Write and fsync what was appended; returns the last committed seq. On a write error
        the records stay pending (tried again by the next commit) and the error is raised."""
        async with self._commit_lock:
            if not self._pending:
                return self.committed_seq
            records, data = self._pending, bytes(self._pending_bytes)
            self._pending, self._pending_bytes = [], bytearray()
            try:
                await asyncio.to_thread(self._write, records[0].seq, records[-1].seq, data)
            except BaseException:
                self._pending[:0] = records
                self._pending_bytes[:0] = data
                raise
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
            advanced, self._advanced = self._advanced, asyncio.Event()
            advanced.set()
            return self.committed_seq

    def _write(self, first_seq: int, last_seq: int, data: bytes) -> None:
        with self._lock:
            newest = self._segments[-1] if self._segments else None
            if newest is None or newest.legacy or newest.size >= self.segment_bytes:
                if self._file is not None:
                    os.close(self._file)
                    self._file = None
                path = self.directory / f"{first_seq:020d}{_SEGMENT_SUFFIX}"
                newest = _Segment(first_seq, path, 0, first_seq - 1)
                self._segments.append(newest)
            if self._file is None:
                self._file = os.open(newest.path, os.O_WRONLY | os.O_CREAT, 0o600)
                os.lseek(self._file, newest.size, os.SEEK_SET)
            offset = newest.size
            if newest.size == 0:
                data = FILE_HEADER + data
                offset = len(FILE_HEADER)
                self._sync_directory()
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._file, view) :]
                if self.fsync:
                    os.fdatasync(self._file)
            except OSError:
                # Never leave half a group behind: it would read as damage in the middle.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._file, newest.size)
                    os.lseek(self._file, newest.size, os.SEEK_SET)
                raise
            newest.index.append((first_seq, offset))
            newest.size += len(data)
            newest.last_seq = last_seq

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
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self.committed_seq <= seq:
                    await self._advanced.wait()

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
        """Records after `after`, from where the previous read of this position stopped (a
        lagging sink reads each segment once, not once per batch), else from the nearest
        indexed record before it."""
        with self._lock:
            segments = list(self._segments)
            committed = self.committed_seq
            ends = {segment.first_seq: segment.size for segment in segments}
        out: list[SpoolRecord] = []
        hint = self._read_hints.pop(after, None)
        for segment in segments:
            if segment.last_seq <= after:
                continue
            offset, before = self._start_of(segment, after, hint)
            try:
                with open(segment.path, "rb") as handle:
                    done = self._read_segment(
                        handle, segment, offset, ends[segment.first_seq], before, after, committed,
                        max_records, out,
                    )  # fmt: skip
            except FileNotFoundError:
                continue  # freed meanwhile: every consumer had confirmed it
            if done:
                break
        return out

    def _start_of(
        self, segment: _Segment, after: int, hint: tuple[int, int] | None
    ) -> tuple[int, int]:
        """(byte offset, seq of the record before it) where a read after `after` may start."""
        if hint is not None and hint[0] == segment.first_seq:
            return hint[1], after
        with self._lock:
            index = list(segment.index)
        position = bisect.bisect_right(index, (after + 1, 1 << 62)) - 1
        if position >= 0:
            seq, offset = index[position]
            return offset, seq - 1
        return first_offset(segment.legacy), segment.first_seq - 1

    def _read_segment(
        self,
        handle: BinaryIO,
        segment: _Segment,
        offset: int,
        end: int,
        before: int,
        after: int,
        committed: int,
        max_records: int,
        out: list[SpoolRecord],
    ) -> bool:
        """Append to `out` the records of one segment after `after`; True once it is full."""
        damage: Damage | None = None
        last = before
        for item in scan(handle, offset, end, legacy=segment.legacy, after_seq=before):
            if isinstance(item, Damage):
                if item.end >= end:
                    self.quarantine.keep(segment, item, last, None)
                else:
                    damage = item
                continue
            record = item.record
            if damage is not None:
                self.quarantine.keep(segment, damage, last, record.seq)
                damage = None
            if record.seq > committed:
                return True
            last = record.seq
            with self._lock:
                self._index(segment, item)
            if record.seq > after:
                out.append(record)
                if len(out) >= max_records:
                    if len(self._read_hints) > 64:
                        self._read_hints.clear()
                    self._read_hints[record.seq] = (segment.first_seq, item.end)
                    return True
        return False

    # --- confirming ---------------------------------------------------------------------------

    async def confirm(self, consumer: str, seq: int) -> None:
        """The consumer has stored everything up to `seq`; persist that, free what all have."""
        if seq <= self.confirmed[consumer]:
            return
        await asyncio.to_thread(self._write_cursor, consumer, seq)
        self.confirmed[consumer] = seq
        floor = self.floor
        while self._unconfirmed and self._unconfirmed[0][0] <= floor:
            self._unconfirmed.popleft()
        if self._segments and self._segments[0].last_seq <= floor:
            await asyncio.to_thread(self._free_segments)
            self._disk_bytes = self.disk_bytes

    def _write_cursor(self, consumer: str, seq: int) -> None:
        # Not followed by an fsync of the folder: a rename lost to a power cut only moves the
        # cursor back, and the records after it are written again, harmlessly.
        path = self._cursor_path(consumer)
        temporary = path.with_suffix(".tmp")
        with open(temporary, "w") as handle:
            handle.write(_cursor_text(seq))
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())
        os.replace(temporary, path)

    def _free_segments(self) -> None:
        floor = self.floor
        with self._lock:
            # Never delete the segment being written.
            while len(self._segments) > 1 and self._segments[0].last_seq <= floor:
                segment = self._segments.pop(0)
                segment.path.unlink(missing_ok=True)
            only = self._segments[0] if len(self._segments) == 1 else None
            if only is not None and only.last_seq <= floor and only.size >= self.segment_bytes:
                # The only segment is full and fully confirmed: start afresh on next write.
                if self._file is not None:
                    os.close(self._file)
                    self._file = None
                self._segments.pop(0).path.unlink(missing_ok=True)

    # --- observing ----------------------------------------------------------------------------

    def depth(self) -> int:
        """Records committed but not yet confirmed by every consumer."""
        return self.committed_seq - self.floor

    def oldest_unconfirmed_age_s(self) -> float | None:
        """Seconds since the oldest record not yet confirmed by every sink was received."""
        if self.depth() <= 0 or not self._unconfirmed:
            return None
        return max(0.0, time.time() - self._unconfirmed[0][1] / 1e6)

    def lag(self) -> dict[str, int]:
        return {name: self.committed_seq - seq for name, seq in self.confirmed.items()}

    def damage_report(self) -> str | None:
        """For `/ready`: quarantined damage awaiting a look (None when there is none)."""
        files = self.quarantine.files()
        if not files:
            return None
        detail = self.quarantine.last_event or f"{len(files)} file(s) of damaged spool bytes"
        return (
            f"spool data was damaged: {detail}; {len(files)} file(s) in {self.quarantine.folder} "
            "(delete them once looked at)"
        )

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                os.close(self._file)
                self._file = None
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    def iter_segment_paths(self) -> Iterator[Path]:
        return (segment.path for segment in self._segments)
