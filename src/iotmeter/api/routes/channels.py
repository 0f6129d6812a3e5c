"""Notification channels (webhook, MQTT), their deliveries, a test event, retries by hand."""

from __future__ import annotations

import base64
import secrets
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response, status
from pydantic import Field, StringConstraints, model_validator
from sqlalchemy import func, select, update

from iotmeter.alerting.notify import url_refused
from iotmeter.api.deps import AFTER_COMMIT, SessionDep, StateDep
from iotmeter.api.schemas import (
    MAX_ID,
    AlertSeverity,
    DisplayName,
    ErrorResponse,
    InputModel,
    Offset,
    OutputModel,
    Page,
)
from iotmeter.db.base import utcnow
from iotmeter.db.models import DeliveryAttempt, Notification, NotificationChannel
from iotmeter.errors import Conflict, NotFound, ValidationFailed

router = APIRouter(tags=["notification channels"])
ChannelIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="The channel id.")]
NotificationIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="The notification id.")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}}
Url = Annotated[str, StringConstraints(min_length=1, max_length=2000, pattern=r"^[^\u0000\s]+$")]
Topic = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256, pattern=r"^[^\u0000#+]+$"),
    Field(
        description="MQTT topic; `{device_id}` is filled in.", examples=["iot/{device_id}/alerts"]
    ),
]
Address = Annotated[
    str,
    StringConstraints(
        max_length=254, pattern=r"^[^@\s\u0000<>,;]+@[^@\s\u0000<>,;]+\.[^@\s\u0000<>,;]+$"
    ),
    Field(examples=["ops@example.com"]),
]
Secret = Annotated[
    str,
    StringConstraints(pattern=r"^whsec_[A-Za-z0-9+/=]{24,200}$"),
    Field(description="A Standard Webhooks secret (`whsec_` + base64 of 24-64 random bytes)."),
]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class ChannelCreate(InputModel):
    name: DisplayName
    kind: Literal["webhook", "mqtt", "email"]
    url: Url | None = Field(None, description="Webhook: the receiver's http(s) URL.")
    email_to: list[Address] | None = Field(
        None, min_length=1, max_length=20, description="Email: the recipients."
    )
    secret: Secret | None = Field(None, description="Webhook: omit to have one made.")
    topic: Topic | None = None
    min_severity: AlertSeverity = "info"
    rule_ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] | None = Field(
        None, max_length=1000, description="Only these rules' alerts (null: every rule)."
    )
    enabled: bool = True

    @model_validator(mode="after")
    def _check(self) -> ChannelCreate:
        if self.kind == "webhook" and self.url is None:
            raise ValueError("a webhook channel needs a url")
        if self.kind == "mqtt" and self.topic is None:
            raise ValueError("an mqtt channel needs a topic")
        if self.kind == "email" and not self.email_to:
            raise ValueError("an email channel needs email_to, a list of addresses")
        return self


class ChannelUpdate(InputModel):
    name: DisplayName | None = None
    url: Url | None = None
    topic: Topic | None = None
    email_to: list[Address] | None = Field(None, min_length=1, max_length=20)
    min_severity: AlertSeverity | None = None
    rule_ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] | None = Field(None, max_length=1000)
    enabled: bool | None = None


class ChannelRead(OutputModel):
    id: int
    name: str
    kind: str
    url: str | None
    topic: str | None
    email_to: list[str] | None = None
    min_severity: str
    rule_ids: list[int] | None
    enabled: bool
    created_at: datetime


class ChannelCreated(ChannelRead):
    secret: str | None = Field(
        description="Webhook: the signing secret, shown this once; receivers verify "
        "`webhook-signature` with it (any Standard Webhooks library)."
    )


class AttemptRead(OutputModel):
    at: datetime
    status_code: int | None
    latency_ms: float
    error: str | None
    response: str | None


class NotificationRead(OutputModel):
    id: int
    channel_id: int
    event_id: str
    event: str
    alert_id: int | None
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    payload: dict[str, Any]
    history: list[AttemptRead] = Field(default_factory=list)


def _check_url(url: str | None, allow_private: bool) -> None:
    if url is None:
        return
    why = url_refused(url, allow_private=allow_private)
    if why is not None:
        raise ValidationFailed(why)


def _changed(session: SessionDep, state: StateDep) -> None:
    session.info.setdefault(AFTER_COMMIT, []).append(state.alert_rules_changed)


async def _get(session: SessionDep, channel_id: int) -> NotificationChannel:
    channel = await session.get(NotificationChannel, channel_id)
    if channel is None:
        raise NotFound(f"channel {channel_id} not found; list them with GET /api/v1/channels")
    return channel


@router.post("/channels", status_code=status.HTTP_201_CREATED, summary="Create a channel")
async def create_channel(
    body: ChannelCreate, session: SessionDep, state: StateDep, response: Response
) -> ChannelCreated:
    """A webhook's signing secret is in this answer only."""
    _check_url(body.url, state.settings.webhook_allow_private)
    fields = body.model_dump()
    if body.kind == "webhook" and body.secret is None:
        fields["secret"] = new_secret()
    channel = NotificationChannel(**fields, created_at=utcnow())
    session.add(channel)
    await session.flush()
    _changed(session, state)
    response.headers["Location"] = f"/api/v1/channels/{channel.id}"
    response.headers["Cache-Control"] = "no-store"
    return ChannelCreated.model_validate(channel)


@router.get("/channels", summary="List channels")
async def list_channels(session: SessionDep) -> list[ChannelRead]:
    rows = await session.scalars(select(NotificationChannel).order_by(NotificationChannel.id))
    return [ChannelRead.model_validate(row) for row in rows]


@router.get("/channels/{channel_id}", responses=NOT_FOUND, summary="Get a channel")
async def get_channel(channel_id: ChannelIdPath, session: SessionDep) -> ChannelRead:
    return ChannelRead.model_validate(await _get(session, channel_id))


@router.patch("/channels/{channel_id}", responses=NOT_FOUND, summary="Change a channel")
async def update_channel(
    channel_id: ChannelIdPath, body: ChannelUpdate, session: SessionDep, state: StateDep
) -> ChannelRead:
    channel = await _get(session, channel_id)
    changes = body.model_dump(exclude_unset=True)
    if "url" in changes:
        if channel.kind != "webhook":
            raise ValidationFailed("only a webhook channel has a url")
        _check_url(changes["url"], state.settings.webhook_allow_private)
    if "topic" in changes and channel.kind != "mqtt":
        raise ValidationFailed("only an mqtt channel has a topic")
    if "email_to" in changes and channel.kind != "email":
        raise ValidationFailed("only an email channel has email_to")
    for name, value in changes.items():
        if value is None and name in (
            "name",
            "min_severity",
            "enabled",
            "url",
            "topic",
            "email_to",
        ):
            raise ValidationFailed(f"{name} cannot be null")
        setattr(channel, name, value)
    await session.flush()
    _changed(session, state)
    return ChannelRead.model_validate(channel)


@router.delete(
    "/channels/{channel_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=NOT_FOUND,
    summary="Delete a channel (with its notifications)",
)
async def delete_channel(channel_id: ChannelIdPath, session: SessionDep, state: StateDep) -> None:
    await session.delete(await _get(session, channel_id))
    _changed(session, state)


@router.post(
    "/channels/{channel_id}/test",
    status_code=status.HTTP_202_ACCEPTED,
    responses=NOT_FOUND,
    summary="Send a test event",
)
async def test_channel(
    channel_id: ChannelIdPath, session: SessionDep, state: StateDep
) -> NotificationRead:
    """Queues an `alert.test` event for the channel (delivered like any other; follow it with
    GET /api/v1/notifications/{id})."""
    channel = await _get(session, channel_id)
    now = utcnow()
    notification = Notification(
        channel_id=channel.id,
        event_id=f"msg_{uuid.uuid4().hex}",
        event="alert.test",
        alert_id=None,
        payload={
            "type": "alert.test",
            "timestamp": now.isoformat(),
            "data": {"channel_id": channel.id, "message": "a test event from iotmeter"},
        },
        status="pending",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(notification)
    await session.flush()
    if state.notifier is not None:
        session.info.setdefault(AFTER_COMMIT, []).append(state.notifier.wake)
    return NotificationRead.model_validate(notification)


@router.get("/notifications", summary="List notifications (the outbox)")
async def list_notifications(
    session: SessionDep,
    channel_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    alert_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    status_: Annotated[
        Literal["pending", "delivered", "failed"] | None, Query(alias="status")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> Page[NotificationRead]:
    conditions = []
    if channel_id is not None:
        conditions.append(Notification.channel_id == channel_id)
    if alert_id is not None:
        conditions.append(Notification.alert_id == alert_id)
    if status_ is not None:
        conditions.append(Notification.status == status_)
    total = await session.scalar(select(func.count()).select_from(Notification).where(*conditions))
    rows = await session.scalars(
        select(Notification)
        .where(*conditions)
        .order_by(Notification.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return Page[NotificationRead](
        items=[NotificationRead.model_validate(row) for row in rows],
        total=total or 0,
        limit=limit,
        offset=offset,
    )


@router.get(
    "/notifications/{notification_id}", responses=NOT_FOUND, summary="A notification and its tries"
)
async def get_notification(
    notification_id: NotificationIdPath, session: SessionDep
) -> NotificationRead:
    notification = await session.get(Notification, notification_id)
    if notification is None:
        raise NotFound(f"notification {notification_id} not found")
    attempts = await session.scalars(
        select(DeliveryAttempt)
        .where(DeliveryAttempt.notification_id == notification_id)
        .order_by(DeliveryAttempt.id)
    )
    read = NotificationRead.model_validate(notification)
    read.history = [AttemptRead.model_validate(attempt) for attempt in attempts]
    return read


@router.post(
    "/notifications/{notification_id}/retry",
    responses={**NOT_FOUND, 409: {"model": ErrorResponse}},
    summary="Deliver a notification again now",
)
async def retry_notification(
    notification_id: NotificationIdPath, session: SessionDep, state: StateDep
) -> NotificationRead:
    """A failed (or pending) notification is tried again at once; a delivered one is 409."""
    notification = await session.get(Notification, notification_id)
    if notification is None:
        raise NotFound(f"notification {notification_id} not found")
    if notification.status == "delivered":
        raise Conflict(f"notification {notification_id} was delivered already")
    await session.execute(
        update(Notification)
        .where(Notification.id == notification_id)
        .values(status="pending", next_attempt_at=utcnow())
    )
    await session.refresh(notification)
    if state.notifier is not None:
        session.info.setdefault(AFTER_COMMIT, []).append(state.notifier.wake)
    return NotificationRead.model_validate(notification)
