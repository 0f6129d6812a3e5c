"""Alert rules, their evaluation state, notification channels and the notification outbox."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from iotmeter.db.base import Base, BigIntId, JSONType, utcnow

RULE_KINDS = ("threshold", "rate_of_change", "no_data", "anomaly")
CHANNEL_KINDS = ("webhook", "mqtt", "email")
NOTIFICATION_STATUSES = ("pending", "delivered", "failed")


class AlertRule(Base):
    """A condition evaluated on every stored reading (or on a timer, for `no_data`)."""

    __tablename__ = "alert_rules"
    __table_args__ = (CheckConstraint(f"kind IN {RULE_KINDS!r}", name="kind"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    device_id: Mapped[str | None] = mapped_column(String(64))
    device_type: Mapped[str | None] = mapped_column(String(32))
    field: Mapped[str | None] = mapped_column(String(64))
    operator: Mapped[str | None] = mapped_column(String(8))
    threshold: Mapped[float | None] = mapped_column(Float)
    low: Mapped[float | None] = mapped_column(Float)
    high: Mapped[float | None] = mapped_column(Float)
    hysteresis: Mapped[float] = mapped_column(Float, default=0.0)
    duration_s: Mapped[float] = mapped_column(Float, default=0.0)
    timeout_s: Mapped[float | None] = mapped_column(Float)
    k: Mapped[float | None] = mapped_column(Float)
    half_life: Mapped[int | None] = mapped_column(Integer)
    warmup: Mapped[int | None] = mapped_column(Integer)
    flap_window_s: Mapped[float] = mapped_column(Float, default=0.0)
    severity: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AlertRuleState(Base):
    """What a rule remembers about one device between readings (and across restarts)."""

    __tablename__ = "alert_rule_states"

    rule_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("alert_rules.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSONType)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class NotificationChannel(Base):
    """Where alert events go: a webhook (Standard Webhooks signed), an MQTT topic or email."""

    __tablename__ = "notification_channels"
    __table_args__ = (CheckConstraint(f"kind IN {CHANNEL_KINDS!r}", name="kind"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    url: Mapped[str | None] = mapped_column(Text)
    secret: Mapped[str | None] = mapped_column(String(200))
    topic: Mapped[str | None] = mapped_column(String(256))
    email_to: Mapped[list[str] | None] = mapped_column(JSONType)
    min_severity: Mapped[str] = mapped_column(String(16), default="info")
    rule_ids: Mapped[list[int] | None] = mapped_column(JSONType)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Notification(Base):
    """The outbox: one event for one channel, written in the transaction of the alert change,
    delivered at least once by the notifier."""

    __tablename__ = "notifications"
    __table_args__ = (
        CheckConstraint(f"status IN {NOTIFICATION_STATUSES!r}", name="status"),
        Index(None, "status", "next_attempt_at"),
        Index(None, "channel_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    channel_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("notification_channels.id", ondelete="CASCADE")
    )
    event_id: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(32))
    alert_id: Mapped[int | None] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]


class DeliveryAttempt(Base):
    """One try at delivering a notification: what the receiver answered, how fast."""

    __tablename__ = "delivery_attempts"
    __table_args__ = (Index(None, "notification_id", "at"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    notification_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("notifications.id", ondelete="CASCADE")
    )
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    response: Mapped[str | None] = mapped_column(Text)
    """At most the first 1 KB of the receiver's answer."""
