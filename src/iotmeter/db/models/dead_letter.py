from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from iotmeter.db.base import Base, BigIntId, utcnow


class DeadLetter(Base):
    """A message (or one element of a batch) the collector refused, kept with its reason."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        Index(None, "received_at"),
        Index(None, "reason", "received_at"),
        Index(None, "device_id", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    """When the message reached the collector (not when the dead letter was written)."""
    topic: Mapped[str] = mapped_column(Text)
    device_id: Mapped[str | None] = mapped_column(String(256))
    reason: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    """The payload, or its first 64 KiB when it was larger (then `payload_size` says how large)."""
    key: Mapped[str | None] = mapped_column(String(40), unique=True)
    """Equal for the same message refused again (a redelivery): it is kept once."""
    payload_size: Mapped[int | None] = mapped_column(BigInteger)
    """The whole payload's size when `payload` holds only its head."""
    payload_sha256: Mapped[str | None] = mapped_column(String(64))
