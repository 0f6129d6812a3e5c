"""Raw archive access: a device's archived messages, and one message by key."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel

from iotmeter.api.deps import SessionDep, StateDep
from iotmeter.api.schemas import ErrorResponse
from iotmeter.api.timerange import format_time, parse_instant_us
from iotmeter.errors import NotFound, ValidationFailed
from iotmeter.services.devices import get_device
from iotmeter.storage.archive.document import parse_key

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
    session: SessionDep,
    start: Annotated[str, Query(description="RFC 3339, `now` or relative like -1h.")] = "-1h",
    stop: Annotated[str, Query(description="RFC 3339, `now` or relative.")] = "now",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    after: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
) -> RawPage:
    """Oldest first. Each document holds the topic, receive time and the payload as received."""
    await get_device(session, device_id)
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


@router.get(
    "/raw/{key:path}",
    responses={**ERRORS, 200: {"content": {"application/json": {}}}},
    summary="One archived message, byte for byte",
)
async def raw_message(key: str, state: StateDep) -> Response:
    """The stored document exactly as archived (key as listed, e.g. `dev-1/20260101T...json`)."""
    try:
        parse_key(key)
    except ValueError:
        raise NotFound(
            f"no archived message {key!r}; keys look like device/20260101T000000.000Z_....json"
        ) from None
    message = await state.archive.get(key)
    return Response(message.body, media_type="application/json")
