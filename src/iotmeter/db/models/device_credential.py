from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from iotmeter.db.base import Base, utcnow


class DeviceCredential(Base):
    """A device's MQTT password, kept as a nonce and a hash (see `devicelink.credentials`)."""

    __tablename__ = "device_credentials"

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    nonce: Mapped[str] = mapped_column(String(64))
    password_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    broker_nonce: Mapped[str | None] = mapped_column(String(64))
    """The nonce whose password the managed broker (Mosquitto) was last given."""


class DeviceCertificate(Base):
    """A device certificate iotmeter signed. No foreign key: a deleted device's certificates
    stay, revoked, so the revocation list keeps naming them until they expire."""

    __tablename__ = "device_certificates"

    serial: Mapped[str] = mapped_column(String(40), primary_key=True)
    """Hexadecimal, lower case."""
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    fingerprint_sha256: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
