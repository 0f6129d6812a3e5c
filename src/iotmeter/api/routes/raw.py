"""Raw archive access: a device's archived messages, and one message by key."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from iotmeter.api.deps import StateDep, require_device
from iotmeter.api.schemas import ErrorResponse
from iotmeter.api.timerange import format_time, parse_instant_us
from iotmeter.errors import NotFound, ValidationFailed
from iotmeter.ingest.decode import DecodeLimits
from iotmeter.services.replay import replay_device
from iotmeter.storage.archive.segments import is_message_key

router = APIRouter(tags=["raw data"])
MAX_PAGE = 200
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
}


class RawMessage(BaseModel):
    key: str
    ts: str
    document: Any


class RawPage(BaseModel):
    items: list[RawMessage]
    next_cursor: str | None


@router.get("/devices/{device_id}/raw", responses=ERRORS, summary="Archived raw messages")
async def device_raw(
    device_id: Annotated[str, Path(max_length=64)],
    state: StateDep,
    start: Annotated[str, Query(description="RFC 3339, `now` or relative like -1h.")] = "-1h",
    stop: Annotated[str, Query(description="RFC 3339, `now` or relative.")] = "now",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    after: Annotated[
        str | None, Query(max_length=512, description="`next_cursor` of the previous page.")
    ] = None,
) -> RawPage:
    """Oldest first. Each document holds the topic, receive time and the payload as received."""
    await require_device(state, device_id)
    now_us = time.time_ns() // 1000
    start_us = parse_instant_us(start, "start", now_us)
    stop_us = parse_instant_us(stop, "stop", now_us)
    if start_us >= stop_us:
        raise ValidationFailed("start must be before stop")
    page = await state.archive.list(device_id, start_us, stop_us, limit=limit, after=after)
    messages = await asyncio.gather(*(state.archive.get(key) for key in page.keys))
    return RawPage(
        items=[
            RawMessage(
                key=message.key,
                ts=format_time(message.epoch_us),
                document=orjson.loads(message.body),
            )
            for message in messages
        ],
        next_cursor=page.next_cursor,
    )


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: str = Field(description="RFC 3339, `now` or relative like -7d.")
    stop: str = Field("now", description="RFC 3339, `now` or relative.")


class ReplayResponse(BaseModel):
    messages: int = Field(description="Archived messages read.")
    readings: int = Field(description="Reading sets written to the time-series store.")
    refused: int = Field(description="Readings the decoder refuses today (not written).")


@router.post(
    "/devices/{device_id}/replay",
    responses=ERRORS,
    summary="Re-ingest archived messages into the time-series store",
)
async def replay(
    device_id: Annotated[str, Path(max_length=64)],
    body: ReplayRequest,
    state: StateDep,
) -> ReplayResponse:
    """Reads the device's archived raw messages in [start, stop) and writes their readings to
    the time-series store again: a backfill after a lost range, a schema change or a move to
    InfluxDB. Idempotent: writes are keyed by device, field and time."""
    await require_device(state, device_id)
    now_us = time.time_ns() // 1000
    start_us = parse_instant_us(body.start, "start", now_us)
    stop_us = parse_instant_us(body.stop, "stop", now_us)
    if start_us >= stop_us:
        raise ValidationFailed("start must be before stop")
    result = await replay_device(
        state.database,
        state.archive,
        state.timeseries,
        device_id,
        start_us,
        stop_us,
        DecodeLimits.from_settings(state.settings),
    )
    return ReplayResponse(
        messages=result.messages, readings=result.readings, refused=result.refused
    )


@router.get(
    "/raw/{key:path}",
    responses={**ERRORS, 200: {"content": {"application/json": {}}}},
    summary="One archived message, byte for byte",
)
async def raw_message(key: str, state: StateDep) -> Response:
    """The stored document exactly as archived (key as listed, e.g. `dev-1/20260101T...json`)."""
    if not is_message_key(key):
        raise NotFound(
            f"no archived message {key!r}; keys look like device/20260101T000000.000Z_....json"
        ) from None
    message = await state.archive.get(key)
    return Response(message.body, media_type="application/json")
