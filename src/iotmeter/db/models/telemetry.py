from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Float, Index, String
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from iotmeter.db.base import Base


class TelemetryPoint(Base):
    """One reading of the SQL time-series store.

    Narrow (device, field, time, value) so that new fields need no migration. The time is an
    integer count of microseconds since the epoch: window arithmetic is then the same integer
    division on PostgreSQL and SQLite, and the primary key makes a repeated write idempotent.
    """

    __tablename__ = "telemetry"
    # PostgreSQL: partitioned by day on `epoch_us` (migration 0008), a BRIN index on the time.
    __table_args__ = (Index("ix_telemetry_epoch_us", "epoch_us", postgresql_using="brin"),)

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


class _Rollup:
    """Aggregates of one (device, field) over one window starting at `bucket_us`."""

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    field: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket_us: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    min_value: Mapped[float] = mapped_column(Float)
    max_value: Mapped[float] = mapped_column(Float)
    sum_value: Mapped[float] = mapped_column(Float)
    count: Mapped[int] = mapped_column(BigInteger)
    first_value: Mapped[float] = mapped_column(Float)
    last_value: Mapped[float] = mapped_column(Float)


class MinuteRollup(_Rollup, Base):
    __tablename__ = "telemetry_rollup_1m"
    __table_args__ = (
        Index("ix_telemetry_rollup_1m_bucket_us", "bucket_us", postgresql_using="brin"),
    )


class HourRollup(_Rollup, Base):
    __tablename__ = "telemetry_rollup_1h"
    __table_args__ = (
        Index("ix_telemetry_rollup_1h_bucket_us", "bucket_us", postgresql_using="brin"),
    )


class RollupState(Base):
    """How far each rollup is complete: every window before `done_until_us` is computed."""

    __tablename__ = "telemetry_rollup_state"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    done_until_us: Mapped[int] = mapped_column(BigInteger)


class RollupDirty(Base):
    """A minute of a series that got a reading after its rollup was computed (a late reading,
    a replay): recomputed by the lifecycle task."""

    __tablename__ = "telemetry_rollup_dirty"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    field: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket_us: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class CompactChunk(Base):
    """One closed hour of one series as two arrays (PostgreSQL; the table is unused on
    SQLite): the times as microseconds after `hour_us`, ascending, and the values."""

    __tablename__ = "telemetry_compact"
    __table_args__ = (Index("ix_telemetry_compact_hour_us", "hour_us"),)

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    field: Mapped[str] = mapped_column(String(64), primary_key=True)
    hour_us: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    offsets_us: Mapped[list[int]] = mapped_column(ARRAY(BigInteger).with_variant(JSON(), "sqlite"))
    point_values: Mapped[list[float]] = mapped_column(ARRAY(Float).with_variant(JSON(), "sqlite"))
