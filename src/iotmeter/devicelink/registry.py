"""The registry as brokers see it: accounts to reconcile, passwords and certificates to check."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from iotmeter.db.engine import Database
from iotmeter.devicelink.credentials import password_matches
from iotmeter.repositories.device_channel import (
    ChannelRepository,
    certificate_revoked,
    credential_hash,
)

if TYPE_CHECKING:
    from iotmeter.devicelink.certificates import DeviceCA

logger = logging.getLogger(__name__)

HASH_CACHE_S = 2.0
"""How long a device's password hash is reused for connects. A fleet reconnecting after a broker
restart (10,000 CONNECTs within seconds) then costs one query per device, not one per attempt;
a rotation or revocation takes effect within this time (the API's change is committed first)."""


class RegistryAccounts:
    """`AccountSource` of the Mosquitto reconciler: every credential and what the broker has."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def wanted(self) -> dict[str, tuple[str, str | None]]:
        async with self.database.transaction() as session:
            return await ChannelRepository(session).broker_accounts()

    async def mark_applied(self, applied: dict[str, str]) -> None:
        async with self.database.transaction() as session:
            await ChannelRepository(session).mark_broker_nonces(applied)


class RegistryCredentialCheck:
    """`CredentialCheck` of the embedded broker: passwords and revocations from the registry."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._hashes: dict[str, tuple[float, str | None]] = {}

    def forget(self) -> None:
        """Drop cached hashes (a credential changed; a `credential_listeners` entry)."""
        self._hashes.clear()

    async def device_password_ok(self, device_id: str, password: str) -> bool:
        now = time.monotonic()
        cached = self._hashes.get(device_id)
        if cached is None or now - cached[0] > HASH_CACHE_S:
            async with self.database.reader() as connection:
                stored = await credential_hash(connection, device_id)
            if len(self._hashes) > 100_000:
                self._hashes.clear()
            self._hashes[device_id] = (now, stored)
        else:
            stored = cached[1]
        return stored is not None and password_matches(password, stored)

    async def certificate_revoked(self, serial_hex: str) -> bool:
        async with self.database.reader() as connection:
            return await certificate_revoked(connection, serial_hex)


class RevocationList:
    """Keeps the CRL file Mosquitto reads (`crlfile`) equal to the registry's revocations."""

    REFRESH_S = 3600.0
    """Written again this often even without a change (its `nextUpdate` moves on)."""

    def __init__(self, database: Database, ca: DeviceCA, path: Path) -> None:
        self.database = database
        self.ca = ca
        self.path = path
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A certificate was revoked (committed): write the list now."""
        self._wake.set()

    async def run(self) -> None:
        """Write the list at start, on every revocation and every hour, until cancelled."""
        while True:
            self._wake.clear()
            try:
                await self.write()
            except Exception:
                logger.exception("cannot write the revocation list to %s; retrying", self.path)
                await asyncio.sleep(5.0)
                self._wake.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.REFRESH_S):
                    await self._wake.wait()

    async def write(self) -> int:
        """Write the list now; the number of certificates it names."""
        async with self._lock:
            async with self.database.transaction() as session:
                revoked = await ChannelRepository(session).revoked_certificates()
            await asyncio.to_thread(self.ca.write_crl, self.path, revoked)
            logger.info(
                "device certificate revocation list written to %s (%d revoked)",
                self.path,
                len(revoked),
            )
            return len(revoked)
