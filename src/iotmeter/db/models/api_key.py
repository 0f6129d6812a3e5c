from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from iotmeter.db.base import Base, BigIntId, utcnow


class ApiKey(Base):
    """An API key: only its hash is kept; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(16), unique=True)
    """The public part of the key (`iotm_<key_id>_<secret>`): names it in lists and logs."""
    secret_hash: Mapped[str] = mapped_column(String(64))
    """SHA-256 (hex) of the whole key. A random 256-bit secret needs no slow hash: nothing
    short of the key itself can be tried against it."""
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
