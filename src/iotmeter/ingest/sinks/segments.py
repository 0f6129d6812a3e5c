"""The archive sink of the segment layout: newline-delimited JSON per device and epoch.

Lines collect per device over an epoch (`archive_segment_max_age_s`, or until the open segments
hold `archive_segment_buffer_bytes`, or until no message came for `archive_segment_quiet_s`);
then every device's segment is written and the epoch's last spool position becomes durable.
Before writing an epoch its last position is recorded (the intent file, fsync'd); after a
crash, exactly the same records are rebuilt into the same segments (same content, same keys)
and written again, so nothing is lost or doubled.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from iotmeter.ingest.batch import Batch
from iotmeter.ingest.directory import DeviceDirectory
from iotmeter.ingest.stats import IngestStats
from iotmeter.readings import ReadingSet
from iotmeter.storage.archive.local import check_device_id
from iotmeter.storage.archive.segments import LayeredArchive, build_segment, segment_line


class _Epoch:
    """The open segments: per device, its lines and their reading times, in spool order.

    Kept compact (a backlog fills the buffer with tens of thousands of lines): per line, the
    bytes, eight bytes of time and a 16-byte digest of its identity; about 390 bytes a line
    of 263 where (time, line) tuples and identity tuples took 578."""

    def __init__(self) -> None:
        self.lines: dict[str, list[bytes]] = {}
        self.times: dict[str, array[int]] = {}
        self.size = 0
        self.started = time.monotonic()
        self.last_added = self.started
        self._seen: set[bytes] = set()

    def add(self, readings: Sequence[ReadingSet]) -> None:
        """All of them or none (a line that cannot be made fails the whole call)."""
        fresh: list[tuple[ReadingSet, bytes]] = []
        digests: set[bytes] = set()
        for reading in readings:
            # A message the broker redelivered within the epoch is written once.
            digest = _identity_digest(reading)
            if digest in self._seen or digest in digests:
                continue
            if reading.device_id not in self.lines:
                check_device_id(reading.device_id)  # once per device and epoch
            digests.add(digest)
            fresh.append((reading, segment_line(reading)))
        if not fresh:
            return
        now = time.monotonic()
        if not self.lines:
            self.started = now
        self.last_added = now
        self._seen |= digests
        for reading, line in fresh:
            device_id = reading.device_id
            lines = self.lines.get(device_id)
            if lines is None:
                lines = self.lines[device_id] = []
                self.times[device_id] = array("q")
            lines.append(line)
            self.times[device_id].append(reading.epoch_us)
            self.size += len(line)

    def segments(self, max_bytes: int, compress: bool) -> Iterator[tuple[str, bytes]]:
        """Every device's segments (split at `max_bytes`), as (key, body), made as they are
        asked for: an upload in flight holds its body, not the whole epoch's bodies at once."""
        for device_id, lines in self.lines.items():
            times = self.times[device_id]
            part: list[tuple[int, bytes]] = []
            size = 0
            for epoch_us, line in zip(times, lines, strict=True):
                if part and size + len(line) > max_bytes:
                    yield build_segment(device_id, part, compress=compress)
                    part, size = [], 0
                part.append((epoch_us, line))
                size += len(line)
            yield build_segment(device_id, part, compress=compress)


def _identity_digest(reading: ReadingSet) -> bytes:
    """128 bits of the reading's identity (equal exactly when the archive keys are): a
    collision is as likely as guessing a random UUID."""
    device_id, epoch_ms, tie = reading.identity
    text = f"{device_id}\x1f{epoch_ms}\x1f{tie}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=16).digest()


class SegmentArchiveSink:
    name = "archive"

    def __init__(
        self,
        archive: LayeredArchive,
        directory: DeviceDirectory,
        stats: IngestStats,
        *,
        intent_path: Path,
        max_age_s: float,
        quiet_s: float,
        buffer_bytes: int,
        segment_max_bytes: int,
        gzip: bool,
    ) -> None:
        self.archive = archive
        self.directory = directory
        self.stats = stats
        self.intent_path = intent_path
        self.max_age_s = max_age_s
        self.quiet_s = quiet_s
        self.buffer_bytes = buffer_bytes
        self.segment_max_bytes = segment_max_bytes
        self.gzip = gzip
        self.durable: int | None = None
        """The last spool seq whose readings are all in written segments (None until the
        first batch: the seq before it)."""
        self._epoch = _Epoch()
        self._taken = -1
        self._rebuild_until: int | None = None

    async def store(self, batch: Batch) -> int | None:
        if self.durable is None:
            # The runner starts after the last confirmed seq: an intent beyond it is an epoch
            # that was being written when the process stopped.
            self.durable = self._taken = batch.first_seq - 1
            intent = await asyncio.to_thread(_read_intent, self.intent_path)
            if intent is not None and intent >= batch.first_seq:
                self._rebuild_until = intent
        if self._rebuild_until is not None:
            until = self._rebuild_until
            head, rest = batch.through(until), batch.after(until)
            if head is not None:
                await self._add(head)
            if batch.last_seq >= until:
                await self._write(until)
                self._rebuild_until = None
            if rest is None:
                return self.durable
            batch = rest
        await self._add(batch)
        epoch = self._epoch
        if not epoch.lines:
            self.durable = batch.last_seq  # nothing open: nothing to wait for
        elif self._due() or epoch.size >= self.buffer_bytes:
            await self._write(batch.last_seq)
        else:
            self._taken = batch.last_seq
        return self.durable

    async def idle(self) -> int | None:
        epoch = self._epoch
        quiet = self.quiet_s > 0 and time.monotonic() - epoch.last_added >= self.quiet_s
        if epoch.lines and (self._due() or quiet) and self._rebuild_until is None:
            await self._write(self._taken)
        return self.durable

    def _due(self) -> bool:
        return time.monotonic() - self._epoch.started >= self.max_age_s

    async def _add(self, batch: Batch) -> None:
        readings = await self.directory.resolve(batch.readings, retype=False)
        self._epoch.add(readings)
        self._taken = batch.last_seq

    async def _write(self, end: int) -> None:
        epoch = self._epoch
        if not epoch.lines:
            self.durable = end
            return
        await asyncio.to_thread(_write_intent, self.intent_path, end)
        await self.archive.put_objects(epoch.segments(self.segment_max_bytes, self.gzip))
        self.durable = end
        self._epoch = _Epoch()
        self.stats.count_stored(
            self.name, Counter({device: len(lines) for device, lines in epoch.lines.items()})
        )


def _read_intent(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _write_intent(path: Path, end: int) -> None:
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w") as handle:
        handle.write(str(end))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
