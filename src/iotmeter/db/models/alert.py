from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from iotmeter.db.base import Base, BigIntId, utcnow

ALERT_SEVERITIES = ("info", "warning", "critical")
ALERT_STATUSES = ("active", "acknowledged", "resolved")
OPEN_RULE_ALERT = "rule_id IS NOT NULL AND status IN ('active', 'acknowledged')"


class DeviceAlert(Base):
    """An alert raised on a device, by hand or by a rule."""

    __tablename__ = "device_alerts"
    __table_args__ = (
        CheckConstraint(f"severity IN {ALERT_SEVERITIES!r}", name="severity"),
        CheckConstraint(f"status IN {ALERT_STATUSES!r}", name="status"),
        Index(None, "device_id", "created_at"),
        Index(None, "status", "created_at"),
        Index(None, "severity", "created_at"),
        Index(None, "created_at"),
        # One open alert per (rule, device): two processes or a replay cannot open another.
        Index(
            "uq_device_alerts_open_rule_device",
            "rule_id",
            "device_id",
            unique=True,
            postgresql_where=text(OPEN_RULE_ALERT),
            sqlite_where=text(OPEN_RULE_ALERT),
        ),
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
    # Set for alerts a rule raised (device time):
    first_breach_at: Mapped[datetime | None]
    last_breach_at: Mapped[datetime | None]
    extreme_value: Mapped[float | None] = mapped_column(Float)
    breach_count: Mapped[int] = mapped_column(Integer, default=0)
    suppressed_count: Mapped[int] = mapped_column(Integer, default=0)
    """Times the rule fired again within its flap window after this alert resolved."""
