"""Dead letters: messages the collector refused, with their reason."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from iotmeter.api.deps import SessionDep
from iotmeter.api.schemas import MAX_ID, ErrorResponse, Offset, Page
from iotmeter.errors import NotFound
from iotmeter.readings import RejectReason
from iotmeter.repositories.dead_letters import (
    PREVIEW_BYTES,
    DeadLetterRepository,
    DeadLetterSummary,
)

router = APIRouter(prefix="/dead-letters", tags=["dead letters"])
MAX_PAGE = 500
LetterId = Annotated[int, Path(ge=1, le=MAX_ID, description="The dead letter's id.")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}}


class DeadLetterRead(BaseModel):
    id: int
    received_at: datetime
    topic: str
    device_id: str | None
    reason: str
    detail: str
    payload_preview: str = Field(
        description=f"The payload's first {PREVIEW_BYTES} bytes, as text when they are "
        "UTF-8, else base64 (`payload_encoding`); the stored bytes are at `payload_url`."
    )
    payload_encoding: Literal["utf-8", "base64"]
    payload_size: int = Field(description="Bytes of the whole payload as received.")
    payload_stored: int = Field(description="Bytes of it kept (at most the first 64 KiB).")
    payload_truncated: bool = Field(
        description="True when the payload was too large to keep whole: only its head is stored."
    )
    payload_url: str


def _read(row: DeadLetterSummary) -> DeadLetterRead:
    try:
        # A preview cut inside a character is still text: drop the partial character.
        preview = row.preview.decode("utf-8")
        encoding: Literal["utf-8", "base64"] = "utf-8"
    except UnicodeDecodeError as exc:
        cut = exc.reason == "unexpected end of data" and row.stored_size > len(row.preview)
        if cut:
            preview, encoding = row.preview[: exc.start].decode("utf-8"), "utf-8"
        else:
            preview, encoding = base64.b64encode(row.preview).decode(), "base64"
    return DeadLetterRead(
        id=row.id,
        received_at=row.received_at,
        topic=row.topic,
        device_id=row.device_id,
        reason=row.reason,
        detail=row.detail,
        payload_preview=preview,
        payload_encoding=encoding,
        payload_size=row.payload_size or row.stored_size,
        payload_stored=row.stored_size,
        payload_truncated=row.payload_size is not None and row.payload_size > row.stored_size,
        payload_url=f"/api/v1/dead-letters/{row.id}/payload",
    )


@router.get("", summary="List dead letters")
async def list_dead_letters(
    session: SessionDep,
    reason: RejectReason | None = None,
    device_id: Annotated[str | None, Query(max_length=256)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Offset = 0,
) -> Page[DeadLetterRead]:
    """Newest first, each with a preview of its payload (the stored bytes: `payload_url`)."""
    rows, total = await DeadLetterRepository(session).list(
        reason=reason.value if reason else None, device_id=device_id, limit=limit, offset=offset
    )
    return Page[DeadLetterRead](
        items=[_read(row) for row in rows], total=total, limit=limit, offset=offset
    )


def _not_found(letter_id: int) -> NotFound:
    return NotFound(f"no dead letter {letter_id}; list them with GET /api/v1/dead-letters")


@router.get("/{letter_id}", responses=NOT_FOUND, summary="One dead letter")
async def get_dead_letter(letter_id: LetterId, session: SessionDep) -> DeadLetterRead:
    row = await DeadLetterRepository(session).summary(letter_id)
    if row is None:
        raise _not_found(letter_id)
    return _read(row)


@router.get(
    "/{letter_id}/payload",
    responses={**NOT_FOUND, 200: {"content": {"application/octet-stream": {}}}},
    summary="A dead letter's stored payload, byte for byte",
)
async def dead_letter_payload(letter_id: LetterId, session: SessionDep) -> Response:
    """The bytes as received (only the first 64 KiB of a payload that was larger)."""
    payload = await DeadLetterRepository(session).payload(letter_id)
    if payload is None:
        raise _not_found(letter_id)
    return Response(bytes(payload), media_type="application/octet-stream")
