from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from iotmeter.db.base import Base


class DeviceSeries(Base):
    """A field a device has sent: one series in the time-series store, and when it began.

    Kept for the limit on new series per device and hour
    (`IOTMETER_MAX_NEW_SERIES_PER_DEVICE_HOUR`).
    No foreign key: the time-series sink may record a series while the API deletes the device;
    the device's deletion deletes its rows.
    """

    __tablename__ = "device_series"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    field: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen_at: Mapped[datetime]
