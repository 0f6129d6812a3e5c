"""Streaming exports: telemetry of one device, of many or of a type, and the raw archive.

Each answer streams in constant memory and carries cursors to resume a cut download with
`after=` (see `iotmeter.services.export` for the order, chunking and cursor, and
`iotmeter.api.export_format` for the bytes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Generic, TypeVar

from fastapi import APIRouter, Path, Query
from fastapi.responses import StreamingResponse

from iotmeter.api.deps import StateDep, require_device
from iotmeter.api.export_format import (
    CSV_HEADER,
    MEDIA_TYPES,
    ExportFormat,
    cursor_record,
    encode_raw_line,
    encode_rows,
    end_record,
    error_record,
)
from iotmeter.api.routes.telemetry import parse_fields
from iotmeter.api.schemas import ErrorResponse
from iotmeter.api.timerange import parse_instant_us
from iotmeter.errors import IotmeterError, ValidationFailed
from iotmeter.ids import DEVICE_ID_RE, DEVICE_TYPE_PATTERN
from iotmeter.services import export as service
from iotmeter.state import AppState

logger = logging.getLogger(__name__)
router = APIRouter(tags=["export"])

T = TypeVar("T")
_STREAM_TEXT = {"schema": {"type": "string"}}
TELEMETRY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    200: {
        "description": "CSV or NDJSON rows with a cursor record after every batch and an end line",
        "content": {"text/csv": _STREAM_TEXT, "application/x-ndjson": _STREAM_TEXT},
    },
}
RAW_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    200: {
        "description": "NDJSON: one archived message a line, cursor records, an end line",
        "content": {"application/x-ndjson": _STREAM_TEXT},
    },
}

StartQuery = Annotated[
    str,
    Query(
        description="RFC 3339 time, `now`, or relative like `-7d` (inclusive); default: from "
        "the beginning. Ignored with `after` (the cursor keeps the first request's range)."
    ),
]
StopQuery = Annotated[
    str,
    Query(description="RFC 3339 time, `now`, or relative (exclusive). Ignored with `after`."),
]
FieldsQuery = Annotated[
    str | None, Query(description="Comma-separated field names; default every field.")
]
FormatQuery = Annotated[
    ExportFormat, Query(description="`ndjson` (one JSON object a line) or `csv`.")
]
AfterQuery = Annotated[
    str | None,
    Query(
        max_length=2048,
        description="The last cursor a cut download received: go on after it.",
    ),
]
_BEGINNING = "1970-01-01T00:00:00Z"


def _range(start: str, stop: str) -> tuple[int, int]:
    now_us = time.time_ns() // 1000
    return parse_instant_us(start, "start", now_us), parse_instant_us(stop, "stop", now_us)


@router.get(
    "/devices/{device_id}/telemetry/export",
    responses=TELEMETRY_RESPONSES,
    response_class=StreamingResponse,
    summary="Stream a device's telemetry as CSV or NDJSON, resumable",
)
async def export_device_telemetry(
    device_id: Annotated[str, Path(max_length=64)],
    state: StateDep,
    fields: FieldsQuery = None,
    start: StartQuery = _BEGINNING,
    stop: StopQuery = "now",
    format: FormatQuery = "ndjson",
    after: AfterQuery = None,
) -> StreamingResponse:
    """Every point in [start, stop), by time then field, one row each, in constant memory.
    After every batch of rows comes a cursor record; `after=<cursor>` resumes a cut download
    without repeating or missing a row. The last line says the export is complete."""
    await require_device(state, device_id)
    start_us, stop_us = _range(start, stop)
    field_names = parse_fields(fields)
    export = service.plan_telemetry_export(
        [device_id],
        selection=service.selection_digest("ids:" + device_id, field_names),
        fields=field_names,
        start_us=start_us,
        stop_us=stop_us,
        after=after,
        chunk_points=state.settings.export_chunk_points,
    )
    return await _telemetry_response(state, export, format)


@router.get(
    "/telemetry/export",
    responses=TELEMETRY_RESPONSES,
    response_class=StreamingResponse,
    summary="Stream the telemetry of many devices, or of a type, resumable",
)
async def export_telemetry(
    state: StateDep,
    device_ids: Annotated[
        str | None,
        Query(description=f"Comma-separated device ids (at most {service.MAX_EXPORT_DEVICES})."),
    ] = None,
    type: Annotated[
        str | None,
        Query(pattern=DEVICE_TYPE_PATTERN, description="Every device of this type instead."),
    ] = None,
    fields: FieldsQuery = None,
    start: StartQuery = _BEGINNING,
    stop: StopQuery = "now",
    format: FormatQuery = "ndjson",
    after: AfterQuery = None,
) -> StreamingResponse:
    """As the export of one device, device after device in id order (each by time, then
    field). Give `device_ids` or `type`, not both; the devices of a type are looked up on each
    request."""
    ids = _device_ids(device_ids, type)
    start_us, stop_us = _range(start, stop)
    field_names = parse_fields(fields)
    devices, selection = await service.resolve_devices(state.database, ids, type)
    export = service.plan_telemetry_export(
        devices,
        selection=service.selection_digest(selection, field_names),
        fields=field_names,
        start_us=start_us,
        stop_us=stop_us,
        after=after,
        chunk_points=state.settings.export_chunk_points,
    )
    return await _telemetry_response(state, export, format)


def _device_ids(text: str | None, device_type: str | None) -> list[str] | None:
    if (text is None) == (device_type is None):
        raise ValidationFailed(
            "give device_ids (comma-separated ids) or type (a device type), exactly one of them"
        )
    if text is None:
        return None
    ids = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not ids:
        raise ValidationFailed("device_ids: give at least one device id")
    if len(ids) > service.MAX_EXPORT_DEVICES:
        raise ValidationFailed(
            f"device_ids: {len(ids)} given, at most {service.MAX_EXPORT_DEVICES}; split the "
            "export, or export by type"
        )
    bad = next((name for name in ids if not DEVICE_ID_RE.fullmatch(name)), None)
    if bad is not None:
        raise ValidationFailed(
            f"device_ids: {bad[:80]!r} is not a device id (1-64 letters, digits, '-', '_' or '.')"
        )
    return ids


async def _telemetry_response(
    state: AppState, export: service.TelemetryExport, form: ExportFormat
) -> StreamingResponse:
    batches = service.telemetry_batches(state.database, state.timeseries, export)

    def encode(batch: service.ExportBatch) -> tuple[bytes, int]:
        text = encode_rows(batch.device_id, batch.rows, form) + cursor_record(batch.cursor, form)
        return text.encode(), len(batch.rows)

    head = CSV_HEADER.encode() if form == "csv" else b""
    return await _streamed(batches, encode, head, form)


async def _streamed(
    items: AsyncIterator[T],
    encode: Callable[[T], tuple[bytes, int]],
    head: bytes,
    form: ExportFormat,
) -> StreamingResponse:
    """A streamed answer of the encoded items and an end line. The first item is read before
    the answer begins, so a store that cannot be reached is still a 503 with its message."""
    reader = _ReadAhead(items)
    try:
        first = await reader.next()
    except BaseException:
        reader.stop()
        raise

    async def body() -> AsyncIterator[bytes]:
        rows = 0
        try:
            if head:
                yield head
            item = first
            while item is not None:
                data, count = encode(item)
                rows += count
                yield data
                item = await reader.next()
        except Exception as exc:
            # The status is sent: say what failed in the stream and leave the end line out, so
            # the client knows to resume from its last cursor.
            message = exc.message if isinstance(exc, IotmeterError) else None
            logger.error("export failed after %d rows", rows, exc_info=exc)
            yield error_record(
                message or "the export failed; see the server log, then resume with after=",
                form,
            ).encode()
            return
        finally:
            reader.stop()
        yield end_record(rows, form).encode()

    return StreamingResponse(body(), media_type=MEDIA_TYPES[form])


_READERS: set[asyncio.Task[None]] = set()
"""Running read-ahead tasks (a reference each, so none is collected while it runs)."""


class _ReadAhead(Generic[T]):
    """Reads the items in a task of its own, one ahead of the answer.

    The next chunk is read from the store while the last one is being sent, and a client that
    goes away never cancels a read half-way (the request's task is cancelled then; SQLite's
    driver leaves its connection unreturned when a query is cancelled): `stop` lets a read in
    progress finish, then the task closes the items. Memory: the item being sent, and the next
    one (read, or being read).
    """

    def __init__(self, items: AsyncIterator[T]) -> None:
        self._items = items
        self._queue: asyncio.Queue[tuple[T | None, BaseException | None]] = asyncio.Queue()
        self._room = asyncio.Semaphore(1)  # read the next item once the last one is taken
        self._reading = False
        self._stopped = False
        self._task = asyncio.create_task(self._run())
        _READERS.add(self._task)
        self._task.add_done_callback(_READERS.discard)

    async def _run(self) -> None:
        try:
            while not self._stopped:
                await self._room.acquire()
                self._reading = True
                try:
                    item = await anext(self._items)
                except StopAsyncIteration:
                    if not self._stopped:
                        await self._queue.put((None, None))
                    return
                finally:
                    self._reading = False
                if self._stopped:
                    return
                await self._queue.put((item, None))
        except Exception as exc:
            if not self._stopped:
                await self._queue.put((None, exc))
        finally:
            await _close(self._items)

    async def next(self) -> T | None:
        """The next item, None after the last; raises what reading raised."""
        item, error = await self._queue.get()
        self._room.release()
        if error is not None:
            raise error
        return item

    def stop(self) -> None:
        """No more items are wanted: a read in progress ends by itself, a wait to hand one
        over is cancelled."""
        self._stopped = True
        if not self._reading:
            self._task.cancel()


async def _close(items: AsyncIterator[Any]) -> None:
    close: Callable[[], Awaitable[None]] | None = getattr(items, "aclose", None)
    if close is not None:
        await close()


@router.get(
    "/devices/{device_id}/raw/export",
    responses=RAW_RESPONSES,
    response_class=StreamingResponse,
    summary="Stream a device's archived raw messages as NDJSON, resumable",
)
async def export_device_raw(
    device_id: Annotated[str, Path(max_length=64)],
    state: StateDep,
    start: StartQuery = _BEGINNING,
    stop: StopQuery = "now",
    after: AfterQuery = None,
) -> StreamingResponse:
    """Oldest first, one line per archived message: `{"key", "ts", "document"}` with the
    archived document's bytes spliced in unchanged (`document_base64` when they cannot stand
    on one line), a cursor record after every page and an end line."""
    await require_device(state, device_id)
    start_us, stop_us = _range(start, stop)
    archive_after = None
    if after:
        cursor = service.RawCursor.decode(after, device_id)
        start_us, stop_us, archive_after = cursor.start_us, cursor.stop_us, cursor.archive_cursor
    elif start_us >= stop_us:
        raise ValidationFailed("start must be before stop")
    pages = service.raw_pages(state.archive, device_id, start_us, stop_us, archive_after)

    def encode(page: tuple[list[Any], str | None]) -> tuple[bytes, int]:
        messages, cursor = page
        data = b"".join(encode_raw_line(message) for message in messages)
        if cursor is not None:
            data += cursor_record(cursor, "ndjson").encode()
        return data, len(messages)

    return await _streamed(pages, encode, b"", "ndjson")
