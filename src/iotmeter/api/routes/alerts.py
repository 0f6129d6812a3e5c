"""Alerts: list, raise by hand, acknowledge, resolve."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response, status

from iotmeter.api.deps import SessionDep
from iotmeter.api.schemas import (
    AlertCreate,
    AlertRead,
    AlertSeverity,
    AlertStatus,
    ErrorResponse,
    Page,
)
from iotmeter.errors import ValidationFailed
from iotmeter.repositories.alerts import AlertRepository
from iotmeter.services import alerts as service

MAX_PAGE = 500

router = APIRouter(prefix="/alerts", tags=["alerts"])
AlertIdPath = Annotated[int, Path(ge=1, description="The alert id.")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}}
TRANSITION: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse},
    409: {"model": ErrorResponse, "description": "Illegal transition"},
}


@router.get("", summary="List alerts")
async def list_alerts(
    session: SessionDep,
    device_id: Annotated[str | None, Query(max_length=64)] = None,
    status: AlertStatus | None = None,
    severity: AlertSeverity | None = None,
    since: Annotated[
        datetime | None, Query(description="Created at or after (RFC 3339, with zone).")
    ] = None,
    until: Annotated[datetime | None, Query(description="Created before (RFC 3339).")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[AlertRead]:
    """Newest first."""
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise ValidationFailed(f"{name} needs a time zone, e.g. 2026-01-01T00:00:00Z")
    if since and until and since >= until:
        raise ValidationFailed("since must be before until")
    rows, total = await AlertRepository(session).list(
        device_id=device_id,
        status=status,
        severity=severity,
        since=since,
        until=until,
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
