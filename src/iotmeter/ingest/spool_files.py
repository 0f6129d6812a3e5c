"""The spool's segment files: recovery at open, appending commit groups, reading records back
from disk, freeing what every consumer has confirmed. Blocking calls: the spool runs them in a
thread. The writer, the thread freeing segments and the readers share the segment list under
one lock."""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from iotmeter.ingest.spool_records import (
    FILE_HEADER,
    Damage,
    Located,
    SpoolRecord,
    first_offset,
    is_legacy,
    scan,
)

logger = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".log"
_INDEX_EVERY = 256
"""Records between two entries of a segment's in-memory index (where a disk read starts)."""


@dataclass(slots=True)
class Segment:
    first_seq: int
    path: Path
    size: int = 0
    """Bytes that hold committed records (for the newest segment: where the next append goes)."""
    last_seq: int = -1
    legacy: bool = False
    index: list[tuple[int, int]] = field(default_factory=list)
    """(seq, offset) of some records, ascending: where a read of a later seq may start."""


class Quarantine:
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

    def keep(self, segment: Segment, damage: Damage, before: int, after: int | None) -> None:
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


class SegmentFiles:
    """The segment files of one spool folder."""

    def __init__(self, directory: Path, *, segment_bytes: int, fsync: bool) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.quarantine = Quarantine(directory / "quarantine")
        self._lock = threading.Lock()
        self._segments: list[Segment] = []
        self._file: int | None = None
        # After-seq -> (segment, byte offset) where a disk read of that position stopped.
        self._read_hints: dict[int, tuple[int, int]] = {}

    def recover(self) -> int | None:
        """Find the segments and where the good records of the newest one end (cutting a torn
        tail, quarantining corruption); returns the last seq on disk, None when there is none."""
        paths = sorted(
            (path for path in self.directory.glob(f"*{SEGMENT_SUFFIX}") if path.stem.isdigit()),
            key=lambda path: int(path.stem),
        )
        for path in paths:
            self._segments.append(Segment(int(path.stem), path, path.stat().st_size))
        for older, newer in itertools.pairwise(self._segments):
            older.last_seq = newer.first_seq - 1
            with open(older.path, "rb") as handle:
                older.legacy = is_legacy(handle)
        if not self._segments:
            return None
        newest = self._segments[-1]
        self._recover_newest(newest)
        return max(newest.last_seq, newest.first_seq - 1)

    @property
    def first_seq(self) -> int | None:
        return self._segments[0].first_seq if self._segments else None

    @property
    def count(self) -> int:
        return len(self._segments)

    @property
    def disk_bytes(self) -> int:
        return sum(segment.size for segment in self._segments)

    def oldest_last_seq(self) -> int | None:
        return self._segments[0].last_seq if self._segments else None

    def paths(self) -> list[Path]:
        return [segment.path for segment in self._segments]

    def _recover_newest(self, segment: Segment) -> None:
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
    def _index(segment: Segment, item: Located) -> None:
        if not segment.index or item.record.seq >= segment.index[-1][0] + _INDEX_EVERY:
            segment.index.append((item.record.seq, item.offset))

    def write(self, first_seq: int, last_seq: int, data: bytes) -> None:
        with self._lock:
            newest = self._segments[-1] if self._segments else None
            if newest is None or newest.legacy or newest.size >= self.segment_bytes:
                if self._file is not None:
                    os.close(self._file)
                    self._file = None
                path = self.directory / f"{first_seq:020d}{SEGMENT_SUFFIX}"
                newest = Segment(first_seq, path, 0, first_seq - 1)
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

    def read(self, after: int, max_records: int, committed: int) -> list[SpoolRecord]:
        """Records after `after`, from where the previous read of this position stopped (a
        lagging sink reads each segment once, not once per batch), else from the nearest
        indexed record before it."""
        with self._lock:
            segments = list(self._segments)
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
        self, segment: Segment, after: int, hint: tuple[int, int] | None
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
        segment: Segment,
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

    def free(self, floor: int) -> None:
        """Delete the segments whose records every consumer has confirmed (up to `floor`)."""
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

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                os.close(self._file)
                self._file = None
