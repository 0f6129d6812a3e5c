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
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from iotmeter.config import env_name
from iotmeter.errors import SettingsInvalid
from iotmeter.ingest.spool_files import SegmentFiles
from iotmeter.ingest.spool_records import SpoolRecord, encode_record

logger = logging.getLogger(__name__)

__all__ = ["Chunk", "Spool", "SpoolInUse", "SpoolRecord", "encode_record"]

_CURSOR_SUFFIX = ".cursor"


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
        self.memory_bytes = memory_bytes
        self.fsync = fsync
        self.files = SegmentFiles(directory, segment_bytes=segment_bytes, fsync=fsync)
        self.quarantine = self.files.quarantine
        self.cursor_resets: list[str] = []
        self._lock_file: int | None = None
        self._pending: list[SpoolRecord] = []
        self._pending_bytes = bytearray()
        self._disk_bytes = 0
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
        last_on_disk = self.files.recover()
        cursors = {consumer: self._read_cursor(consumer) for consumer in self.consumers}
        known = [seq for seq in cursors.values() if seq is not None]
        if last_on_disk is not None:
            self._next_seq = last_on_disk + 1
        # A cursor past the newest record (records lost to damage) must not be reused.
        self._next_seq = max(self._next_seq, max(known, default=-1) + 1)
        self.committed_seq = self._next_seq - 1
        first = self.files.first_seq
        start = first - 1 if first is not None else self.committed_seq
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
        self.files.free(self.floor)
        self._disk_bytes = self.files.disk_bytes
        if self.committed_seq > self.floor:
            oldest = self.files.read(self.floor, 1, self.committed_seq)
            if oldest:
                self._unconfirmed.append((self.committed_seq, oldest[0].received_at_us))
        logger.info(
            "spool at %s: %d segment(s), %d record(s) not yet confirmed by every sink",
            self.directory,
            self.files.count,
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
        return self.files.disk_bytes

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
                await asyncio.to_thread(self.files.write, records[0].seq, records[-1].seq, data)
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
            self._disk_bytes = self.files.disk_bytes
            advanced, self._advanced = self._advanced, asyncio.Event()
            advanced.set()
            return self.committed_seq

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
        records = await asyncio.to_thread(self.files.read, after, max_records, self.committed_seq)
        return [Chunk(records)] if records else []

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
        oldest = self.files.oldest_last_seq()
        if oldest is not None and oldest <= floor:
            await asyncio.to_thread(self.files.free, floor)
            self._disk_bytes = self.files.disk_bytes

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
        self.files.close()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    def iter_segment_paths(self) -> Iterator[Path]:
        return iter(self.files.paths())
