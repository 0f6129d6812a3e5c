"""The segment archive layout: newline-delimited JSON per device, one object per segment.

One object per message caps the archive at the object store's small-PUT rate; a segment holds
many messages of one device: `{device_id}/{first}_{last}_{hash}.ndjson[.gz]`, where first and
last are the earliest and latest reading times inside (to the millisecond) and the hash (of the
content) keeps two segments with the same bounds apart while a rewrite of the same content
lands on the same key. Each line is the per-message document with the reading's time in front:
`{"epoch_us": ..., "topic": ..., "received_at": ..., "batch_index": ..., "payload": ...}`.

A message inside a segment is addressed as `{segment key}@{line number}`.
`LayeredArchive` reads both layouts, so the raw-data API and replay see one archive whatever
layout wrote it (and after a change of layout).
"""

from __future__ import annotations

import builtins
import gzip
import hashlib
import heapq
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from iotmeter.errors import NotFound, ValidationFailed
from iotmeter.readings import ReadingSet, format_key_time
from iotmeter.storage.archive.base import (
    ArchivedMessage,
    ArchivePage,
    ArchiveStore,
    ArchiveWrites,
    StoredObject,
)
from iotmeter.storage.archive.document import encode_archive_document, key_bound, parse_key
from iotmeter.storage.usage import StoreUsage

_SEGMENT_NAME = re.compile(
    r"^(\d{8}T\d{6}\.\d{3}Z)_(\d{8}T\d{6}\.\d{3}Z)_[0-9a-f]{16}\.ndjson(\.gz)?$"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CACHED_SEGMENTS = 16


class ObjectStore(ArchiveStore, Protocol):
    """An archive backend that can also hold whole objects (both backends can)."""

    async def put_objects(self, objects: Iterable[tuple[str, bytes]]) -> None: ...

    async def list_objects(
        self, device_id: str, start_after: str, limit: int
    ) -> builtins.list[str]: ...

    async def get_object(self, key: str) -> bytes: ...

    async def read_object(self, key: str) -> StoredObject:
        """A message or segment object's bytes with the hash recorded alongside them."""
        ...

    async def devices(self) -> builtins.list[str]:
        """Ids of the devices that have anything archived."""
        ...


def _parse_time(stamp: str) -> int:
    moment = datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def segment_line(reading: ReadingSet) -> bytes:
    """One NDJSON line: the archive document with the reading's time in front."""
    return b'{"epoch_us":%d,' % reading.epoch_us + encode_archive_document(reading)[1:] + b"\n"


def build_segment(
    device_id: str, lines: Sequence[tuple[int, bytes]], *, compress: bool
) -> tuple[str, bytes]:
    """The key and body of a segment from (epoch_us, line) pairs in arrival order."""
    body = b"".join(line for _epoch, line in lines)
    first = min(epoch for epoch, _line in lines)
    last = max(epoch for epoch, _line in lines)
    digest = hashlib.sha256(body).hexdigest()[:16]
    name = f"{format_key_time(first)}_{format_key_time(last)}_{digest}.ndjson"
    if compress:
        # mtime=0: the same lines always give the same bytes, so a rewrite is idempotent.
        return f"{device_id}/{name}.gz", gzip.compress(body, compresslevel=1, mtime=0)
    return f"{device_id}/{name}", body


def segment_bounds(key: str) -> tuple[int, int] | None:
    """(first, last) reading time of a segment object key (last rounded up to its ms)."""
    match = _SEGMENT_NAME.match(key.partition("/")[2])
    if match is None:
        return None
    return _parse_time(match.group(1)), _parse_time(match.group(2)) + 999


def is_message_key(key: str) -> bool:
    """A key the raw-data API can serve: a per-message key or a line of a segment."""
    object_key, hash_, line = key.partition("@")
    if hash_:
        return line.isdigit() and segment_bounds(object_key) is not None
    try:
        parse_key(key)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True, order=True)
class _Item:
    epoch_us: int
    key: str


def _cursor(item: _Item) -> str:
    return f"{item.epoch_us}:{item.key}"


_CURSOR_TIME = re.compile(r"-?[0-9]{1,18}")


def _parse_cursor(after: str | None) -> _Item | None:
    if not after:
        return None
    epoch, separator, key = after.partition(":")
    if not separator or not _CURSOR_TIME.fullmatch(epoch):
        # A plain key (a cursor of the per-message store): its time is in the key.
        try:
            return _Item(parse_key(after)[1], after)
        except ValueError:
            raise ValidationFailed(
                f"after={after[:80]!r} is not a cursor; pass the `next_cursor` of the "
                "previous page as it was given"
            ) from None
    return _Item(int(epoch), key)


class LayeredArchive:
    """Reads both layouts of an object store; writes per message (segments come from the
    collector's segment writer, through `put_objects`)."""

    def __init__(self, store: ObjectStore, *, lookback_us: int) -> None:
        self.store = store
        self.backend = store.backend
        self.lookback_us = lookback_us
        self._segments: OrderedDict[str, list[bytes]] = OrderedDict()

    @property
    def writes(self) -> ArchiveWrites:
        return self.store.writes

    async def put(self, readings: Sequence[ReadingSet]) -> None:
        """Per-message objects, write-once (an existing key keeps its first bytes)."""
        await self.store.put(readings)

    async def put_objects(self, objects: Iterable[tuple[str, bytes]]) -> None:
        """Segment objects, write-once (the key holds the content's hash)."""
        await self.store.put_objects(objects)

    async def health(self) -> str | None:
        return await self.store.health()

    async def usage(self) -> StoreUsage:
        """Oldest message kept and space used, both layouts (see the backend's `usage`)."""
        return await self.store.usage()

    async def expire(self, older_than_us: int, *, limit: int) -> int:
        """Delete up to `limit` archived objects, both layouts, whose time (a segment: its
        last message) lies before `older_than_us`; how many went. The local folder deletes
        them here; S3 returns 0, its bucket's lifecycle rule expires objects (set at start-up
        from `IOTMETER_ARCHIVE_RETENTION_DAYS`)."""
        deleted = await self.store.expire(older_than_us, limit=limit)
        if deleted:
            self._segments.clear()
        return deleted

    async def _lines(self, object_key: str) -> builtins.list[bytes]:
        lines = self._segments.get(object_key)
        if lines is None:
            body = await self.store.get_object(object_key)
            if object_key.endswith(".gz"):
                body = gzip.decompress(body)
            lines = body.splitlines()
            self._segments[object_key] = lines
            while len(self._segments) > _CACHED_SEGMENTS:
                self._segments.popitem(last=False)
        else:
            self._segments.move_to_end(object_key)
        return lines

    async def list(
        self,
        device_id: str,
        start_us: int,
        stop_us: int,
        *,
        limit: int,
        after: str | None = None,
    ) -> ArchivePage:
        """Messages of both layouts with time in [start, stop), oldest first.

        Segments are found from `start - lookback` on (a segment is named by its earliest
        reading, which may lie before `start`)."""
        cursor = _parse_cursor(after)
        low = start_us if cursor is None else max(start_us, cursor.epoch_us)
        found: builtins.list[_Item] = []

        def wanted(item: _Item) -> bool:
            if not start_us <= item.epoch_us < stop_us:
                return False
            return cursor is None or (item.epoch_us, item.key) > (cursor.epoch_us, cursor.key)

        # Per-message objects. The store lists from the cursor's time on, so the cursor's own
        # message (and others of its time before it) come back too: read past them, or a page
        # followed by exactly `limit` messages said it was the last, and many messages of one
        # time could hide the rest.
        fetch = limit + 1
        while True:
            page = await self.store.list(device_id, low, stop_us, limit=fetch)
            fresh = [
                item
                for item in (_Item(parse_key(key)[1], key) for key in page.keys)
                if wanted(item)
            ]
            if len(fresh) > limit or len(page.keys) < fetch:
                break
            fetch = len(page.keys) + limit + 1 - len(fresh)
        found.extend(fresh)
        # Segments, oldest first by their earliest reading; stop once they start too late.
        object_keys = await self.store.list_objects(
            device_id, key_bound(device_id, low - self.lookback_us), 10_000
        )
        for object_key in object_keys:
            bounds = segment_bounds(object_key)
            if bounds is None or bounds[1] < low or bounds[0] >= stop_us:
                continue
            if len(found) > limit and bounds[0] > heapq.nsmallest(limit + 1, found)[-1].epoch_us:
                break
            for index, line in enumerate(await self._lines(object_key)):
                epoch_us = int(line[12 : line.index(b",")])
                item = _Item(epoch_us, f"{object_key}@{index}")
                if wanted(item):
                    found.append(item)
        ordered = sorted(found, key=lambda item: (item.epoch_us, item.key))
        items = ordered[:limit]
        next_cursor = _cursor(items[-1]) if len(ordered) > limit else None
        return ArchivePage(keys=[item.key for item in items], next_cursor=next_cursor)

    async def get(self, key: str) -> ArchivedMessage:
        object_key, hash_, line = key.partition("@")
        if not hash_:
            return await self.store.get(key)
        bounds = segment_bounds(object_key)
        if bounds is None or not line.isdigit():
            raise NotFound(f"no archived message {key!r}")
        lines = await self._lines(object_key)
        index = int(line)
        if index >= len(lines):
            raise NotFound(f"no archived message {key!r}")
        line_bytes = lines[index]
        comma = line_bytes.index(b",")
        # Drop the `"epoch_us":N,` prefix: the rest is the per-message document, byte for byte.
        return ArchivedMessage(
            key=key,
            device_id=object_key.partition("/")[0],
            epoch_us=int(line_bytes[12:comma]),
            body=b"{" + line_bytes[comma + 1 :],
        )
