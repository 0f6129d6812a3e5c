"""Telemetry queries: ranges with optional windows, latest values."""

from __future__ import annotations

import csv
import io
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from iotmeter.api.deps import StateDep, require_device
from iotmeter.api.schemas import ErrorResponse
from iotmeter.api.timerange import format_time, parse_duration_us, parse_instant_us
from iotmeter.errors import ValidationFailed
from iotmeter.ids import DEVICE_ID_RE, FIELD_NAME_RE
from iotmeter.services.telemetry import check_point_count, plan_query
from iotmeter.storage.timeseries.base import AGGREGATES, Aggregate, SeriesPoint

router = APIRouter(tags=["telemetry"])
MAX_LATEST_DEVICES = 500
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
}


class Point(BaseModel):
    ts: str
    value: float


class Series(BaseModel):
    field: str
    points: list[Point]


class TelemetryResponse(BaseModel):
    device_id: str
    start: str
    stop: str
    every: str | None
    aggregate: Aggregate | None
    series: list[Series]


class LatestValue(BaseModel):
    ts: str
    value: float


class DeviceLatest(BaseModel):
    device_id: str
    fields: dict[str, LatestValue]


class LatestMany(BaseModel):
    devices: dict[str, dict[str, LatestValue]]


def parse_fields(text: str | None) -> list[str] | None:
    """Comma-separated field names of a query, or `ValidationFailed` naming the bad one."""
    if not text:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if not FIELD_NAME_RE.fullmatch(name)]
    if bad:
        raise ValidationFailed(
            f"fields: {bad[0]!r} is not a field name (1 to 64 ASCII letters, digits, '_', '.' "
            "or '-', not starting with '_' and not 'time')"
        )
    return names


def _wants_csv(request: Request, format: str | None) -> bool:
    if format is not None:
        return format == "csv"
    accept = request.headers.get("accept", "")
    return "text/csv" in accept and "application/json" not in accept


def _latest_values(points: dict[str, SeriesPoint]) -> dict[str, LatestValue]:
    return {
        name: LatestValue(ts=format_time(point.epoch_us), value=point.value)
        for name, point in sorted(points.items())
    }


@router.get(
    "/devices/{device_id}/telemetry",
    responses={
        **ERRORS,
        200: {"content": {"text/csv": {}}, "description": "JSON, or CSV when asked for"},
    },
    summary="Telemetry of one device over a time range",
)
async def device_telemetry(
    device_id: Annotated[str, Path(max_length=64)],
    request: Request,
    state: StateDep,
    fields: Annotated[
        str | None, Query(description="Comma-separated field names; default all.")
    ] = None,
    start: Annotated[
        str, Query(description="RFC 3339 time, `now`, or relative like `-1h` (inclusive).")
    ] = "-1h",
    stop: Annotated[str, Query(description="RFC 3339 time, `now`, or relative (exclusive).")] = (
        "now"
    ),
    every: Annotated[
        str | None, Query(description="Window length, e.g. `1m`; omitted: raw points.")
    ] = None,
    aggregate: Annotated[
        Aggregate, Query(description=f"Function per window: {', '.join(AGGREGATES)}.")
    ] = "mean",
    format: Annotated[
        Literal["json", "csv"] | None,
        Query(description="`csv` for CSV; default JSON (or CSV with `Accept: text/csv`)."),
    ] = None,
) -> Any:
    """Raw points, or one point per window (time = window start, windows aligned to the
    epoch). The range and the number of points are bounded by settings; over them, a 400
    says what to change."""
    await require_device(state, device_id)
    now_us = time.time_ns() // 1000
    start_us = parse_instant_us(start, "start", now_us)
    stop_us = parse_instant_us(stop, "stop", now_us)
    query = plan_query(
        state.settings,
        device_id,
        start_us=start_us,
        stop_us=stop_us,
        every_us=parse_duration_us(every, "every") if every else None,
        every_text=every,
        fields=parse_fields(fields),
        aggregate=aggregate,
    )
    points = await state.timeseries.query(query)
    check_point_count(state.settings, points)
    if _wants_csv(request, format):
        return Response(_csv(device_id, points), media_type="text/csv; charset=utf-8")
    return JSONResponse(
        {
            "device_id": device_id,
            "start": format_time(start_us),
            "stop": format_time(stop_us),
            "every": every,
            "aggregate": aggregate if every else None,
            "series": _series(points),
        }
    )


def _csv(device_id: str, points: list[SeriesPoint]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["device_id", "field", "ts", "value"])
    for point in points:
        writer.writerow([device_id, point.field, format_time(point.epoch_us), repr(point.value)])
    return buffer.getvalue()


def _series(points: list[SeriesPoint]) -> list[dict[str, Any]]:
    """The `series` of a `TelemetryResponse`, built as plain data: a model per point costs more
    than the query (and the route declares no response model, so nothing is validated twice)."""
    series: dict[str, list[dict[str, Any]]] = {}
    stamps: dict[int, str] = {}  # windows repeat across fields
    for point in points:
        values = series.get(point.field)
        if values is None:
            values = series[point.field] = []
        ts = stamps.get(point.epoch_us)
        if ts is None:
            ts = stamps[point.epoch_us] = format_time(point.epoch_us)
        values.append({"ts": ts, "value": point.value})
    return [{"field": name, "points": values} for name, values in series.items()]


@router.get(
    "/devices/{device_id}/latest",
    responses=ERRORS,
    summary="Latest value of each field of a device",
)
async def device_latest(
    device_id: Annotated[str, Path(max_length=64)], state: StateDep
) -> DeviceLatest:
    await require_device(state, device_id)
    latest = await state.timeseries.latest([device_id])
    return DeviceLatest(device_id=device_id, fields=_latest_values(latest.get(device_id, {})))


@router.get("/telemetry/latest", responses=ERRORS, summary="Latest values of many devices")
async def latest_many(
    state: StateDep,
    device_ids: Annotated[
        str, Query(description=f"Comma-separated device ids (at most {MAX_LATEST_DEVICES}).")
    ],
) -> LatestMany:
    """For list views: one call for a page of devices. Devices without data are left out."""
    ids = list(dict.fromkeys(name.strip() for name in device_ids.split(",") if name.strip()))
    if not ids:
        raise ValidationFailed("device_ids: give at least one device id")
    if len(ids) > MAX_LATEST_DEVICES:
        raise ValidationFailed(
            f"device_ids: {len(ids)} given, at most {MAX_LATEST_DEVICES}; split the request"
        )
    bad = next((name for name in ids if not DEVICE_ID_RE.fullmatch(name)), None)
    if bad is not None:
        raise ValidationFailed(
            f"device_ids: {bad[:80]!r} is not a device id (1-64 letters, digits, '-', '_' or '.')"
        )
    latest = await state.timeseries.latest(ids)
    return LatestMany(devices={name: _latest_values(points) for name, points in latest.items()})
