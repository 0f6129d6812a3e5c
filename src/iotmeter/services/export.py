"""Streaming export of telemetry and of the raw archive, resumable at any cursor.

Rows: one per point, `device_id, field, ts, value` (the long form the telemetry CSV already
uses: a new field needs no new column, so the header is known before the first row).

Order: device by device in id order (code point order), and within a device by time, then
field. Device then time, not one time line across devices: the server then reads one device at
a time, so its memory does not grow with the number of devices (an export by type may cover a
whole fleet).

Chunking: each field of a device is read as its own keyset stream with
`TimeSeriesStore.scan` (one series in time order, `start = last time + 1 µs`, `limit`); a
(device, field, time) holds one point, so the keyset needs no tie-breaker. The streams of a
device are merged by time a chunk at a time: all buffered points up to the earliest "last
buffered time" of the streams not yet exhausted can be sent in order, then the streams that ran
dry are read again. A batch holds at most about `IOTMETER_EXPORT_CHUNK_POINTS` points and the
server holds two per export (the one being sent, the next one read ahead; see
`iotmeter.api.routes.export`) plus what the socket buffers, whatever the range.
`IOTMETER_QUERY_MAX_RANGE_S` and `IOTMETER_QUERY_MAX_POINTS` bound interactive queries, not
exports.

Cursor: after every batch (at most one chunk of rows) the stream carries a cursor record. The
cursor is base64url of JSON holding the export's resolved range, a digest of its selection
(devices or type, fields) and the last row sent (device, time, field); `after=<cursor>` goes on
from the row after it, so a download cut at any byte and resumed from the last cursor it
received repeats nothing and misses nothing. Relative times (`-1h`, `now`) are resolved once,
by the first request: the cursor keeps that range, so a resumed download ends where the first
one would have.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import orjson

from iotmeter.db.engine import Database
from iotmeter.errors import NotFound, ValidationFailed
from iotmeter.ids import DEVICE_ID_RE, FIELD_NAME_RE
from iotmeter.repositories import export as repository
from iotmeter.storage.archive.base import ArchivedMessage, ArchiveStore
from iotmeter.storage.timeseries.base import TimeSeriesStore

_LAST_EPOCH_US = 2**63 - 1
MAX_EXPORT_DEVICES = 1000
"""Most device ids one `device_ids=` export names (an export by type has no such limit)."""
FIELD_LOOKUP_DEVICES = 100
"""Devices whose fields are looked up in one pair of queries."""
MIN_FIELD_CHUNK = 10
"""Fewest points read per field stream, however many fields a device has."""
RAW_EXPORT_PAGE = 100
"""Archived messages read at a time by a raw export (each at most the payload limit)."""
_CURSOR_HELP = (
    "pass the last cursor an export sent (the `cursor` of an NDJSON line, or what follows "
    "`# cursor=` in CSV) with the same devices, type and fields, or leave `after` out to "
    "start from the beginning"
)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _decode_cursor(text: str, kind: str) -> dict[str, Any]:
    """The JSON object of a cursor of this kind, or `ValidationFailed` saying what to do."""
    try:
        decoded = orjson.loads(_b64decode(text.strip()))
    except (binascii.Error, ValueError):
        decoded = None
    if not isinstance(decoded, dict) or decoded.get("v") != 1 or decoded.get("k") != kind:
        raise ValidationFailed(f"after={text[:80]!r} is not an export cursor; {_CURSOR_HELP}")
    return decoded


def _int_field(decoded: dict[str, Any], name: str, text: str) -> int:
    value = decoded.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _LAST_EPOCH_US:
        raise ValidationFailed(f"after={text[:80]!r} is a damaged export cursor; {_CURSOR_HELP}")
    return value


@dataclass(frozen=True, slots=True)
class TelemetryCursor:
    """Where a telemetry export stands: after (device_id, epoch_us, field) of its range."""

    selection: str
    start_us: int
    stop_us: int
    device_id: str
    epoch_us: int
    field: str

    def encode(self) -> str:
        return _b64encode(
            orjson.dumps(
                {
                    "v": 1,
                    "k": "telemetry",
                    "s": self.selection,
                    "a": self.start_us,
                    "b": self.stop_us,
                    "d": self.device_id,
                    "t": self.epoch_us,
                    "f": self.field,
                }
            )
        )

    @classmethod
    def decode(cls, text: str, selection: str) -> TelemetryCursor:
        """The cursor `text` of the export `selection`, or `ValidationFailed`."""
        decoded = _decode_cursor(text, "telemetry")
        device_id, field = decoded.get("d"), decoded.get("f")
        start_us, stop_us = _int_field(decoded, "a", text), _int_field(decoded, "b", text)
        epoch_us = _int_field(decoded, "t", text)
        if (
            not isinstance(device_id, str)
            or not DEVICE_ID_RE.fullmatch(device_id)
            or not isinstance(field, str)
            or not FIELD_NAME_RE.fullmatch(field)
            or not start_us <= epoch_us < stop_us
        ):
            raise ValidationFailed(
                f"after={text[:80]!r} is a damaged export cursor; {_CURSOR_HELP}"
            )
        if decoded.get("s") != selection:
            raise ValidationFailed(
                "after: this cursor belongs to an export of other devices, type or fields; "
                "repeat the request that sent it (same device_ids or type, and fields) with "
                "after=<cursor>, or leave after out to start from the beginning"
            )
        return cls(selection, start_us, stop_us, device_id, epoch_us, field)


def selection_digest(devices: str, fields: Sequence[str] | None) -> str:
    """A short digest of what an export covers, kept in its cursors."""
    text = orjson.dumps([devices, sorted(fields) if fields is not None else None])
    return _b64encode(hashlib.sha256(text).digest()[:12])


@dataclass(frozen=True, slots=True)
class TelemetryExport:
    """A planned export: devices in id order, the fields (None: each device's own) and range."""

    device_ids: list[str]
    fields: list[str] | None
    start_us: int
    stop_us: int
    selection: str
    after: TelemetryCursor | None
    chunk_points: int


def plan_telemetry_export(
    device_ids: Sequence[str],
    *,
    selection: str,
    fields: list[str] | None,
    start_us: int,
    stop_us: int,
    after: str | None,
    chunk_points: int,
) -> TelemetryExport:
    """The export to run, or `ValidationFailed`. With `after`, the cursor's range applies."""
    cursor = TelemetryCursor.decode(after, selection) if after else None
    if cursor is not None:
        start_us, stop_us = cursor.start_us, cursor.stop_us
    elif start_us >= stop_us:
        raise ValidationFailed("start must be before stop")
    return TelemetryExport(
        device_ids=sorted(set(device_ids)),
        fields=fields,
        start_us=start_us,
        stop_us=stop_us,
        selection=selection,
        after=cursor,
        chunk_points=chunk_points,
    )


async def resolve_devices(
    database: Database, device_ids: Sequence[str] | None, device_type: str | None
) -> tuple[list[str], str]:
    """The devices of an export (sorted) and the selection text its cursors are bound to:
    given ids (all registered, else `NotFound` naming the missing ones) or a type's devices."""
    async with database.reader() as connection:
        if device_ids is not None:
            ids = sorted(set(device_ids))
            found = await repository.existing_devices(connection, ids)
            missing = [device_id for device_id in ids if device_id not in found]
            if missing:
                shown = ", ".join(repr(device_id) for device_id in missing[:5])
                raise NotFound(
                    f"no registered device {shown}"
                    + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
                    + "; check device_ids (GET /api/v1/devices lists them)"
                )
            return ids, "ids:" + ",".join(ids)
        assert device_type is not None
        ids = await repository.devices_of_type(connection, device_type)
        if not ids:
            raise NotFound(
                f"no registered device has type {device_type!r}; "
                "GET /api/v1/stats lists the types in use"
            )
        return ids, "type:" + device_type


@dataclass(frozen=True, slots=True)
class ExportBatch:
    """Rows of one device in (time, field) order and the cursor that follows the last one."""

    device_id: str
    rows: list[tuple[int, str, float]]
    cursor: str


async def _fields_of(
    database: Database, store: TimeSeriesStore, device_ids: Sequence[str]
) -> dict[str, list[str]]:
    """Every field each device has: the registry's series (every field the ingest path took)
    and the store's latest values (fields written by other paths, e.g. a replay)."""
    async with database.reader() as connection:
        found = await repository.series_fields(connection, device_ids)
    latest = await store.latest(device_ids)
    for device_id, points in latest.items():
        found.setdefault(device_id, set()).update(points)
    return {device_id: sorted(found.get(device_id, ())) for device_id in device_ids}


async def telemetry_batches(
    database: Database, store: TimeSeriesStore, export: TelemetryExport
) -> AsyncIterator[ExportBatch]:
    """The export's rows in batches of at most about `chunk_points`, each with its cursor."""
    cursor = export.after
    device_ids = export.device_ids
    if cursor is not None:
        device_ids = [device_id for device_id in device_ids if device_id >= cursor.device_id]
    for group_start in range(0, len(device_ids), FIELD_LOOKUP_DEVICES):
        group = device_ids[group_start : group_start + FIELD_LOOKUP_DEVICES]
        if export.fields is not None:
            fields_of = {device_id: sorted(set(export.fields)) for device_id in group}
        else:
            fields_of = await _fields_of(database, store, group)
        for device_id in group:
            resume = None
            if cursor is not None and cursor.device_id == device_id:
                resume = (cursor.epoch_us, cursor.field)
            async for rows in _device_rows(store, device_id, fields_of[device_id], export, resume):
                last_epoch_us, last_field, _ = rows[-1]
                position = TelemetryCursor(
                    export.selection,
                    export.start_us,
                    export.stop_us,
                    device_id,
                    last_epoch_us,
                    last_field,
                )
                yield ExportBatch(device_id, rows, position.encode())


_TIME_OF = itemgetter(0)


async def _device_rows(
    store: TimeSeriesStore,
    device_id: str,
    fields: Sequence[str],
    export: TelemetryExport,
    resume: tuple[int, str] | None,
) -> AsyncIterator[list[tuple[int, str, float]]]:
    """One device's points as (time, field, value) in that order, a merged chunk at a time."""
    if not fields:
        return
    per_field = max(min(MIN_FIELD_CHUNK, export.chunk_points), export.chunk_points // len(fields))
    next_start: dict[str, int] = {}
    for field in fields:
        if resume is None:
            next_start[field] = export.start_us
        else:
            # Rows sort by (time, field): at the cursor's time only later fields remain.
            epoch_us, after_field = resume
            next_start[field] = epoch_us if field > after_field else epoch_us + 1
    unread = set(fields)  # streams the store may still hold points of
    buffers: dict[str, list[tuple[int, float]]] = {}
    while True:
        for field in fields:
            if field in buffers or field not in unread:
                continue
            if next_start[field] >= export.stop_us:
                unread.discard(field)
                continue
            points = await store.scan(
                device_id, field, next_start[field], export.stop_us, per_field
            )
            if len(points) < per_field:
                unread.discard(field)
            if points:
                buffers[field] = points
                next_start[field] = points[-1][0] + 1
        if not buffers:
            return
        # Points up to the earliest end of a stream that may hold more are final in order.
        horizon = min(
            (buffers[field][-1][0] for field in buffers if field in unread),
            default=_LAST_EPOCH_US,
        )
        rows: list[tuple[int, str, float]] = []
        for field in list(buffers):
            points = buffers[field]
            cut = bisect.bisect_right(points, horizon, key=_TIME_OF)
            rows.extend([(epoch_us, field, value) for epoch_us, value in points[:cut]])
            if cut == len(points):
                del buffers[field]
            else:
                buffers[field] = points[cut:]
        if len(fields) > 1:
            rows.sort()
        yield rows


# Raw archive export.


@dataclass(frozen=True, slots=True)
class RawCursor:
    """Where a raw export stands: the archive's own page cursor, and the export's range."""

    device_id: str
    start_us: int
    stop_us: int
    archive_cursor: str

    def encode(self) -> str:
        return _b64encode(
            orjson.dumps(
                {
                    "v": 1,
                    "k": "raw",
                    "d": self.device_id,
                    "a": self.start_us,
                    "b": self.stop_us,
                    "c": self.archive_cursor,
                }
            )
        )

    @classmethod
    def decode(cls, text: str, device_id: str) -> RawCursor:
        decoded = _decode_cursor(text, "raw")
        start_us, stop_us = _int_field(decoded, "a", text), _int_field(decoded, "b", text)
        archive_cursor = decoded.get("c")
        if not isinstance(archive_cursor, str) or start_us >= stop_us:
            raise ValidationFailed(
                f"after={text[:80]!r} is a damaged export cursor; {_CURSOR_HELP}"
            )
        if decoded.get("d") != device_id:
            raise ValidationFailed(
                "after: this cursor belongs to the raw export of another device; resume with "
                "the device it came from, or leave after out to start from the beginning"
            )
        return cls(device_id, start_us, stop_us, archive_cursor)


async def raw_pages(
    archive: ArchiveStore, device_id: str, start_us: int, stop_us: int, after: str | None
) -> AsyncIterator[tuple[list[ArchivedMessage], str | None]]:
    """A device's archived messages oldest first, a page at a time with the cursor after it
    (None after the last page)."""
    while True:
        limit = RAW_EXPORT_PAGE
        page = await archive.list(device_id, start_us, stop_us, limit=limit, after=after)
        messages = [await archive.get(key) for key in page.keys]
        following = page.next_cursor
        if following is None and len(page.keys) == limit and "@" not in page.keys[-1]:
            # A full page may end early: `LayeredArchive.list` counts the message at its
            # cursor among the `limit + 1` it reads, so after a cursor it reports no next page
            # when exactly `limit` follow. A per-message key is a cursor every layout takes:
            # go on after it until a page is short.
            following = page.keys[-1]
        cursor = None
        if following is not None:
            cursor = RawCursor(device_id, start_us, stop_us, following).encode()
        yield messages, cursor
        if following is None:
            return
        after = following
