"""Alerts: list, raise by hand, acknowledge, resolve."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response, status

from iotmeter.api.deps import SessionDep
from iotmeter.api.schemas import (
    MAX_ID,
    AlertCreate,
    AlertRead,
    AlertSeverity,
    AlertStatus,
    ErrorResponse,
    Offset,
    Page,
)
from iotmeter.api.timerange import from_epoch_us, parse_instant_us
from iotmeter.errors import ValidationFailed
from iotmeter.repositories.alerts import AlertRepository
from iotmeter.services import alerts as service

MAX_PAGE = 500

router = APIRouter(prefix="/alerts", tags=["alerts"])
AlertIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="The alert id.")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}}
TRANSITION: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse},
    409: {"model": ErrorResponse, "description": "Illegal transition"},
}


def _moment(text: str | None, name: str, now_us: int) -> datetime | None:
    return None if text is None else from_epoch_us(parse_instant_us(text, name, now_us))


@router.get("", summary="List alerts")
async def list_alerts(
    session: SessionDep,
    device_id: Annotated[str | None, Query(max_length=64)] = None,
    status: AlertStatus | None = None,
    severity: AlertSeverity | None = None,
    since: Annotated[
        str | None,
        Query(description="Created at or after: RFC 3339 with a zone, `now` or relative (-1h)."),
    ] = None,
    until: Annotated[
        str | None, Query(description="Created before: RFC 3339, `now` or relative.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Offset = 0,
) -> Page[AlertRead]:
    """Newest first."""
    now_us = time.time_ns() // 1000
    since_at = _moment(since, "since", now_us)
    until_at = _moment(until, "until", now_us)
    if since_at and until_at and since_at >= until_at:
        raise ValidationFailed("since must be before until")
    rows, total = await AlertRepository(session).list(
        device_id=device_id,
        status=status,
        severity=severity,
        since=since_at,
        until=until_at,
        limit=limit,
        offset=offset,
    )
    return Page[AlertRead](
        items=[AlertRead.model_validate(row) for row in rows],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=NOT_FOUND,
    summary="Raise an alert by hand",
)
async def create_alert(body: AlertCreate, session: SessionDep, response: Response) -> AlertRead:
    alert = await service.create_alert(session, body.model_dump())
    response.headers["Location"] = f"/api/v1/alerts/{alert.id}"
    return AlertRead.model_validate(alert)


@router.get("/{alert_id}", responses=NOT_FOUND, summary="Get an alert")
async def get_alert(alert_id: AlertIdPath, session: SessionDep) -> AlertRead:
    return AlertRead.model_validate(await service.get_alert(session, alert_id))


@router.post("/{alert_id}/acknowledge", responses=TRANSITION, summary="Acknowledge an alert")
async def acknowledge_alert(alert_id: AlertIdPath, session: SessionDep) -> AlertRead:
    """active -> acknowledged; anything else is 409."""
    return AlertRead.model_validate(await service.acknowledge_alert(session, alert_id))


@router.post("/{alert_id}/resolve", responses=TRANSITION, summary="Resolve an alert")
async def resolve_alert(alert_id: AlertIdPath, session: SessionDep) -> AlertRead:
    """active or acknowledged -> resolved; resolving twice is 409."""
    return AlertRead.model_validate(await service.resolve_alert(session, alert_id))
