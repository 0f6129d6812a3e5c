"""The registry as the sinks see it: which devices are admitted, and each one's type, cached.

Admission is decided here, once, for every sink: a device is admitted when it is registered, or
when auto-registration is on and `IOTMETER_MAX_DEVICES` leaves room, in which case the first sink
to meet it registers it (with the type of its first reading, in spool order, which every sink
reads alike). A device refused for want of room is remembered for `REFUSAL_TTL_S`, so that the
sinks behind agree without asking again, and a flood from refused devices costs one query per
sink every few seconds.

The cache has an owner who keeps it true: the API reports every device it changes or deletes
(`forget`, called after the change is committed), and an entry older than `ttl_s` is read again,
for changes made by another process. When the registry cannot be read, a device known before
stays admitted with its last known type.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from iotmeter.config import env_name
from iotmeter.db.engine import Database
from iotmeter.errors import BackendUnavailable
from iotmeter.readings import ReadingSet
from iotmeter.repositories.devices import DeviceRepository

logger = logging.getLogger(__name__)

UNKNOWN_TYPE = "unknown"
DEFAULT_TTL_S = 60.0
REFUSAL_TTL_S = 5.0


@dataclass(frozen=True, slots=True)
class Admission:
    """The registry's answer for the devices of a batch."""

    types: dict[str, str]
    """Each admitted device's registered type."""
    unknown: set[str]
    """Devices not registered, with auto-registration off."""
    over_limit: set[str]
    """New devices refused because the registry holds `IOTMETER_MAX_DEVICES` devices."""


class DeviceDirectory:
    """Which devices are admitted, and each one's registered type, for the sinks."""

    def __init__(
        self,
        database: Database,
        auto_register: bool,
        *,
        max_devices: int = 0,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        self.database = database
        self.auto_register = auto_register
        self.max_devices = max_devices
        self.ttl_s = ttl_s
        self._types: dict[str, tuple[str, float]] = {}
        self._over_limit: dict[str, float] = {}
        self._deciding = asyncio.Lock()

    def forget(self, device_ids: Iterable[str]) -> None:
        """These devices changed (type, or deleted): read them again when next needed. A device
        deleted may make room for one refused before, so refusals are forgotten too."""
        for device_id in device_ids:
            self._types.pop(device_id, None)
        self._over_limit.clear()

    def learn(self, types: dict[str, str]) -> None:
        now = time.monotonic()
        self._types.update((device_id, (kind, now)) for device_id, kind in types.items())

    def type_of(self, device_id: str) -> str | None:
        entry = self._types.get(device_id)
        if entry is None or time.monotonic() - entry[1] > self.ttl_s:
            return None
        return entry[0]

    async def admit(self, first_types: dict[str, str], *, registrar: bool = False) -> Admission:
        """Decide for these devices (id -> the type of its first reading in the batch).

        The `registrar` (the registry sink) must see new devices registered: for it a registry
        that cannot be read is always `BackendUnavailable`."""
        now = time.monotonic()
        known: dict[str, str] = {}
        over_limit: set[str] = set()
        ask: dict[str, str] = {}
        for device_id, kind in first_types.items():
            registered = self.type_of(device_id)
            if registered is not None:
                known[device_id] = registered
            elif now - self._over_limit.get(device_id, -REFUSAL_TTL_S) < REFUSAL_TTL_S:
                over_limit.add(device_id)
            else:
                ask[device_id] = kind
        if not ask:
            return Admission(known, set(), over_limit)
        async with self._deciding:  # the sinks of this process ask one at a time
            return await self._ask(ask, known, over_limit, registrar)

    async def _ask(
        self, ask: dict[str, str], known: dict[str, str], over_limit: set[str], registrar: bool
    ) -> Admission:
        now = time.monotonic()
        for device_id in list(ask):  # decided by another sink while this one waited
            registered = self.type_of(device_id)
            if registered is not None:
                known[device_id] = registered
                del ask[device_id]
            elif now - self._over_limit.get(device_id, -REFUSAL_TTL_S) < REFUSAL_TTL_S:
                over_limit.add(device_id)
                del ask[device_id]
        if not ask:
            return Admission(known, set(), over_limit)
        try:
            async with self.database.transaction() as session:
                devices = DeviceRepository(session)
                found = await devices.types_of(ask)
                missing = {key: kind for key, kind in ask.items() if key not in found}
                added: dict[str, str] = {}
                if missing and self.auto_register:
                    added = await devices.register_missing(missing, limit=self.max_devices)
        except Exception as exc:
            stale = {key: entry[0] for key in ask if (entry := self._types.get(key))}
            if self.auto_register and not self.max_devices and not registrar:
                # Every device is admitted; the type only labels the series, and the
                # device's own is the best guess. The registry sink registers it later.
                known.update(ask)
                known.update(stale)
                return Admission(known, set(), over_limit)
            if len(stale) == len(ask) and not registrar:
                known.update(stale)  # known before: a registry outage does not stop them
                return Admission(known, set(), over_limit)
            raise BackendUnavailable(f"registry lookup failed: {exc}") from exc
        if added:
            logger.info("registered %d new device(s): %s", len(added), ", ".join(sorted(added)[:5]))
        found.update(added)
        self.learn(found)
        known.update(found)
        unknown: set[str] = set()
        for device_id in missing.keys() - added.keys():
            if self.auto_register:
                over_limit.add(device_id)
                self._over_limit[device_id] = now
            else:
                unknown.add(device_id)
        refused = over_limit & ask.keys()
        if refused:
            logger.warning(
                "refused %d new device(s), the registry holds %s=%d devices: %s",
                len(refused),
                env_name("max_devices"),
                self.max_devices,
                ", ".join(sorted(refused)[:5]),
            )
        return Admission(known, unknown, over_limit)

    async def resolve(
        self, readings: Sequence[ReadingSet], *, retype: bool = True
    ) -> list[ReadingSet]:
        """The readings of admitted devices, with the registry's type (with `retype`)."""
        if self.auto_register and not self.max_devices and not retype:
            return list(readings)  # every device is admitted: nothing to ask
        # The usual case, every sink, every batch: all its devices known and fresh. One pass,
        # one clock read (the general path below costs three passes and a clock read per device).
        now = time.monotonic()
        cached, ttl = self._types, self.ttl_s
        fast: list[ReadingSet] = []
        for reading in readings:
            entry = cached.get(reading.device_id)
            if entry is None or now - entry[1] > ttl:
                break
            fast.append(
                reading
                if not retype or reading.device_type == entry[0]
                else replace(reading, device_type=entry[0])
            )
        else:
            return fast
        first_types: dict[str, str] = {}
        for reading in readings:
            if reading.device_id not in first_types:
                first_types[reading.device_id] = reading.device_type or UNKNOWN_TYPE
        types = (await self.admit(first_types)).types
        result = []
        for reading in readings:
            registered = types.get(reading.device_id)
            if registered is None:
                continue
            result.append(
                reading
                if not retype or reading.device_type == registered
                else replace(reading, device_type=registered)
            )
        return result
