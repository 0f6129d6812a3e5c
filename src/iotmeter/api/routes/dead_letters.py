"""Dead letters: messages the collector refused, with their reason."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from iotmeter.api.deps import SessionDep
from iotmeter.api.schemas import Page
from iotmeter.readings import RejectReason
from iotmeter.repositories.dead_letters import DeadLetterRepository

router = APIRouter(prefix="/dead-letters", tags=["dead letters"])
MAX_PAGE = 500


class DeadLetterRead(BaseModel):
    id: int
    received_at: datetime
    topic: str
    device_id: str | None
    reason: str
    detail: str
    payload: str
    payload_encoding: Literal["utf-8", "base64"]
    payload_size: int = Field(description="Bytes of the whole payload as received.")
    payload_truncated: bool = Field(
        description="True when the payload was too large to keep: `payload` is its head."
    )


@router.get("", summary="List dead letters")
async def list_dead_letters(
    session: SessionDep,
    reason: RejectReason | None = None,
    device_id: Annotated[str | None, Query(max_length=256)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[DeadLetterRead]:
    """Newest first. The payload is text when it is UTF-8, else base64."""
    rows, total = await DeadLetterRepository(session).list(
        reason=reason.value if reason else None, device_id=device_id, limit=limit, offset=offset
    )
    items = []
    for row in rows:
        try:
            payload, encoding = row.payload.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(row.payload).decode(), "base64"
        items.append(
            DeadLetterRead(
                id=row.id,
                received_at=row.received_at,
                topic=row.topic,
                device_id=row.device_id,
                reason=row.reason,
                detail=row.detail,
                payload=payload,
                payload_encoding=encoding,
                payload_size=row.payload_size or len(row.payload),
                payload_truncated=row.payload_size is not None,
            )
        )
    return Page[DeadLetterRead](items=items, total=total, limit=limit, offset=offset)
