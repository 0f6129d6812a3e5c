from __future__ import annotations

from sqlalchemy import BigInteger, Float, String
from sqlalchemy.orm import Mapped, mapped_column

from iotmeter.db.base import Base


class TelemetryPoint(Base):
    """One reading of the SQL time-series store.

    Narrow (device, field, time, value) so that new fields need no migration. The time is an
    integer count of microseconds since the epoch: window arithmetic is then the same integer
    division on PostgreSQL and SQLite, and the primary key makes a repeated write idempotent.
    """

    __tablename__ = "telemetry"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    field: Mapped[str] = mapped_column(String(64), primary_key=True)
    epoch_us: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    value: Mapped[float] = mapped_column(Float)


class LatestPoint(Base):
    """The newest reading of each field of each device, kept on write for list views."""

    __tablename__ = "telemetry_latest"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    field: Mapped[str] = mapped_column(String(64), primary_key=True)
    epoch_us: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[float] = mapped_column(Float)
