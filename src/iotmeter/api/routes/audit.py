"""The audit log of write requests (admin only)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from iotmeter.api.deps import SessionDep
from iotmeter.api.schemas import Offset, Page
from iotmeter.api.timerange import from_epoch_us, parse_instant_us
from iotmeter.repositories.api_keys import AuditRepository

router = APIRouter(prefix="/audit", tags=["audit"])
MAX_PAGE = 500


class AuditRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor: str
    role: str | None
    method: str
    route: str
    target: str | None
    status: int
    client: str | None


@router.get("", summary="Write requests, newest first")
async def list_audit(
    session: SessionDep,
    actor: Annotated[str | None, Query(max_length=200, description="Only this actor.")] = None,
    since: Annotated[
        str | None, Query(description="RFC 3339 with a zone, `now` or relative (-1h).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Offset = 0,
) -> Page[AuditRead]:
    since_at = (
        None
        if since is None
        else from_epoch_us(parse_instant_us(since, "since", time.time_ns() // 1000))
    )
    rows, total = await AuditRepository(session).list(
        actor=actor, since=since_at, limit=limit, offset=offset
    )
    return Page[AuditRead](
        items=[AuditRead.model_validate(row) for row in rows],
        total=total,
        limit=limit,
        offset=offset,
    )
