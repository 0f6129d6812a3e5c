from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from iotmeter.db.base import Base, BigIntId, utcnow

ALERT_SEVERITIES = ("info", "warning", "critical")
ALERT_STATUSES = ("active", "acknowledged", "resolved")


class DeviceAlert(Base):
    """An alert raised on a device, by hand or (later) by a rule."""

    __tablename__ = "device_alerts"
    __table_args__ = (
        CheckConstraint(f"severity IN {ALERT_SEVERITIES!r}", name="severity"),
        CheckConstraint(f"status IN {ALERT_STATUSES!r}", name="status"),
        Index(None, "device_id", "created_at"),
        Index(None, "status", "created_at"),
        Index(None, "severity", "created_at"),
        Index(None, "created_at"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    severity: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="active")
    message: Mapped[str] = mapped_column(Text)
    field: Mapped[str | None] = mapped_column(String(64))
    value: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    rule_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    acknowledged_at: Mapped[datetime | None]
    resolved_at: Mapped[datetime | None]
