from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, String
from sqlalchemy.orm import Mapped, mapped_column

from iotmeter.db.base import Base, BigIntId, utcnow


class AuditEntry(Base):
    """One write request to the API: who, as what, did what to which target, with what outcome."""

    __tablename__ = "audit_log"
    __table_args__ = (Index(None, "at"), Index(None, "actor", "at"))

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    """`key:<key_id> (<name>)`, `jwt:<subject>`, `anonymous` (auth off) or `unauthenticated`."""
    role: Mapped[str | None] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(10))
    route: Mapped[str] = mapped_column(String(200))
    """The route's template (`/api/v1/devices/{device_id}`), or the path when none matched."""
    target: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[int]
    client: Mapped[str | None] = mapped_column(String(64))
