"""The limit on new series per device and hour, kept by the time-series sink.

Every field a device sends is a series in the time-series store, and a store's cost grows with
its series (InfluxDB's index, the SQL tables' latest-value rows), so one device must not be able
to create thousands in a burst. The guard knows each device's fields (table `device_series`,
read once per device and then kept in memory) and when each began; a reading set whose new
fields would take the device past `per_hour` new series within the hour before it arrived is
refused (`series_limit`). Times are the arrival times kept in the spool, so a replay after a
crash decides as the first pass did.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from iotmeter.config import env_name
from iotmeter.db.engine import Database
from iotmeter.readings import ReadingSet
from iotmeter.repositories.series import SeriesRepository

HOUR_US = 3_600_000_000


class SeriesGuard:
    """Admits reading sets whose new fields fit the device's budget of new series per hour."""

    def __init__(self, database: Database, per_hour: int) -> None:
        self.database = database
        self.per_hour = per_hour
        self._fields: dict[str, dict[str, int]] = {}
        """device -> field -> when the series began (epoch microseconds)."""

    def forget(self, device_ids: Iterable[str]) -> None:
        """These devices were deleted (or changed): read their series again when needed."""
        for device_id in device_ids:
            self._fields.pop(device_id, None)

    async def check(
        self, readings: Sequence[ReadingSet]
    ) -> tuple[list[ReadingSet], list[tuple[ReadingSet, str]]]:
        """(admitted, refused with the sentence for the sender). New series of the admitted
        are recorded before this returns, so a write that then fails admits them again."""
        fields = self._fields
        if all(
            (known := fields.get(reading.device_id)) is not None
            and reading.values.keys() <= known.keys()
            for reading in readings
        ):
            return list(readings), []
        unloaded = {reading.device_id for reading in readings} - fields.keys()
        if unloaded:
            async with self.database.transaction() as session:
                fields.update(await SeriesRepository(session).of_devices(unloaded))
        began: dict[str, dict[str, int]] = {}
        admitted: list[ReadingSet] = []
        refused: list[tuple[ReadingSet, str]] = []
        for reading in readings:
            device_id = reading.device_id
            known = fields[device_id]
            pending = began.get(device_id, {})
            new = [name for name in reading.values if name not in known and name not in pending]
            if not new:
                admitted.append(reading)
                continue
            if self.per_hour:
                since = reading.received_at_us - HOUR_US
                recent = sum(1 for at in known.values() if at > since) + sum(
                    1 for at in pending.values() if at > since
                )
                if recent + len(new) > self.per_hour:
                    refused.append((reading, self._why(device_id, recent, new)))
                    continue
            began.setdefault(device_id, {}).update(dict.fromkeys(new, reading.received_at_us))
            admitted.append(reading)
        if began:
            async with self.database.transaction() as session:
                await SeriesRepository(session).add(began)
            for device_id, new_fields in began.items():
                fields[device_id].update(new_fields)
        return admitted, refused

    def _why(self, device_id: str, recent: int, new: list[str]) -> str:
        shown = ", ".join(repr(name) for name in new[:5]) + (", ..." if len(new) > 5 else "")
        return (
            f"device {device_id!r} began {recent} new series in the hour before this message, "
            f"and its {len(new)} new field(s) ({shown}) would pass the limit of {self.per_hour} "
            f"({env_name('max_new_series_per_device_hour')}); not written to the time series "
            "(the archive keeps the message). Send fewer distinct field names, or raise the limit"
        )
