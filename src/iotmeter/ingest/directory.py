"""The registry as the sinks see it: each device's registered type, cached.

The cache has an owner who keeps it true: the API reports every device it changes or deletes
(`forget`, called after the change is committed), and an entry older than `ttl_s` is read again,
for changes made by another process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace

from iotmeter.db.engine import Database
from iotmeter.errors import BackendUnavailable
from iotmeter.readings import ReadingSet
from iotmeter.repositories.devices import DeviceRepository

UNKNOWN_TYPE = "unknown"
DEFAULT_TTL_S = 60.0


class DeviceDirectory:
    """Each device's registered type, for the sinks."""

    def __init__(
        self, database: Database, auto_register: bool, *, ttl_s: float = DEFAULT_TTL_S
    ) -> None:
        self.database = database
        self.auto_register = auto_register
        self.ttl_s = ttl_s
        self._types: dict[str, tuple[str, float]] = {}

    def forget(self, device_ids: Iterable[str]) -> None:
        """These devices changed (type, or deleted): read them again when next needed."""
        for device_id in device_ids:
            self._types.pop(device_id, None)

    def learn(self, types: dict[str, str]) -> None:
        now = time.monotonic()
        self._types.update((device_id, (kind, now)) for device_id, kind in types.items())

    def type_of(self, device_id: str) -> str | None:
        entry = self._types.get(device_id)
        if entry is None or time.monotonic() - entry[1] > self.ttl_s:
            return None
        return entry[0]

    async def resolve(
        self, readings: Sequence[ReadingSet], *, retype: bool = True
    ) -> list[ReadingSet]:
        """Readings with the registry's type (with `retype`); without those of unregistered
        devices when auto-registration is off (the registry sink dead-letters them)."""
        if self.auto_register and not retype:
            return list(readings)
        known: dict[str, str] = {}
        missing: set[str] = set()
        for reading in readings:
            device_id = reading.device_id
            if device_id in known or device_id in missing:
                continue
            kind = self.type_of(device_id)
            if kind is None:
                missing.add(device_id)
            else:
                known[device_id] = kind
        if missing:
            try:
                async with self.database.transaction() as session:
                    found = await DeviceRepository(session).types_of(missing)
            except Exception as exc:
                if not self.auto_register:
                    raise BackendUnavailable(f"registry lookup failed: {exc}") from exc
                found = {}  # the type only labels the series; the device's own is the best guess
            self.learn(found)
            known.update(found)
        result = []
        for reading in readings:
            registered = known.get(reading.device_id)
            if registered is None:
                if not self.auto_register:
                    continue
                # Not registered yet: the registry sink registers it with the type of its first
                # reading, as seen here in the same spool order.
                registered = known[reading.device_id] = reading.device_type or UNKNOWN_TYPE
            result.append(
                reading
                if not retype or reading.device_type == registered
                else replace(reading, device_type=registered)
            )
        return result
