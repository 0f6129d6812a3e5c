from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from iotmeter.db.base import Base, JSONType, utcnow

DEVICE_STATUSES = ("active", "inactive", "maintenance")


class Device(Base):
    """A registered device; its id is the one used in MQTT topics."""

    __tablename__ = "devices"
    __table_args__ = (
        CheckConstraint(f"status IN {DEVICE_STATUSES!r}", name="status"),
        Index(None, "type"),
        Index(None, "status"),
        Index(None, "location"),
        Index(None, "last_seen_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(32))
    location: Mapped[str | None] = mapped_column(String(200))
    # `metadata` is reserved on declarative classes, so the attribute has another name.
    attributes: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    last_seen_at: Mapped[datetime | None]
    # The device channel (`iotmeter.devicelink`): connection status from the broker...
    connected: Mapped[bool | None]
    last_connected_at: Mapped[datetime | None]
    last_disconnected_at: Mapped[datetime | None]
    # ...and configuration: the desired version grows on every change of its keys; the
    # published one is what `iot/{id}/config` holds; the reported one is what the device applied.
    config_version: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    config_published_version: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    reported_config_version: Mapped[int | None]
    reported_config: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    reported_at: Mapped[datetime | None]
