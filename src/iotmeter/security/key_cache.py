"""Verified API keys kept in memory, so a request need not read the registry; and when each key
was last used.

Looking a key up cost a query per request: it halved the API's throughput (device get 2,837 ->
1,330 requests/s, README "Performance"). A cache must not outlive a revocation, in this process
or in any other (several API processes, or `iotmeter keys revoke`). On PostgreSQL the revoking
transaction sends `NOTIFY iotmeter_api_keys` (delivered with its commit) and every process
`LISTEN`s on a connection of its own: a notification evicts the key, and the cache serves only
while that connection is known to be up (checked every `CHECK_S`; on loss it is emptied and
bypassed until listening again). An entry is also kept at most `MAX_AGE_S`, a bound on a
notification lost without the connection failing. SQLite has no notifications, so there every
request reads the key, as before (SQLite is the single-user embedded default).

A request that read a key before a revocation's eviction cannot put the stale key back: entries
are stored only when no eviction happened since the read began (`generation`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from sqlalchemy.engine import make_url

from iotmeter.repositories.api_keys import KEYS_CHANNEL
from iotmeter.security.keys import matches

logger = logging.getLogger(__name__)

MAX_AGE_S = 300.0
CHECK_S = 10.0
MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class CachedKey:
    secret_hash: str
    name: str
    role: str
    expires_at: datetime | None
    cached_at: float


class KeyCache:
    """Usable keys by key id; serves only while `active` (listening for revocations)."""

    def __init__(self) -> None:
        self._keys: dict[str, CachedKey] = {}
        self.generation = 0
        self.active = False
        self._used: dict[str, datetime] = {}

    def get(self, key_id: str, token: str) -> CachedKey | None:
        """The cached key when `token` is it; None when unknown here (ask the registry)."""
        if not self.active:
            return None
        entry = self._keys.get(key_id)
        if entry is None:
            return None
        if time.monotonic() - entry.cached_at > MAX_AGE_S or not matches(token, entry.secret_hash):
            self._keys.pop(key_id, None)
            return None
        return entry

    def put(
        self,
        key_id: str,
        secret_hash: str,
        name: str,
        role: str,
        expires_at: datetime | None,
        *,
        generation: int,
    ) -> None:
        """Keep a key read from the registry when the read began at `generation`."""
        if not self.active or generation != self.generation:
            return
        if len(self._keys) >= MAX_ENTRIES:
            self._keys.clear()
        self._keys[key_id] = CachedKey(secret_hash, name, role, expires_at, time.monotonic())

    def evict(self, key_id: str | None = None) -> None:
        """Forget one key (or all): it was revoked here or elsewhere."""
        self.generation += 1
        if key_id is None:
            self._keys.clear()
        else:
            self._keys.pop(key_id, None)

    # --- last use -----------------------------------------------------------------------------

    def used(self, key_id: str, at: datetime) -> None:
        self._used[key_id] = at

    def take_used(self) -> dict[str, datetime]:
        used, self._used = self._used, {}
        return used

    def give_back(self, used: dict[str, datetime]) -> None:
        """Uses that could not be written: kept for the next try (newer ones win)."""
        for key_id, at in used.items():
            if key_id not in self._used or self._used[key_id] < at:
                self._used[key_id] = at

    # --- listening (PostgreSQL) ---------------------------------------------------------------

    async def listen(self, database_url: str) -> None:
        """Run until cancelled: keep a LISTEN connection, serve from the cache while it is up."""
        url = make_url(database_url).set(drivername="postgresql")
        dsn = url.render_as_string(hide_password=False)
        delay = 1.0
        while True:
            try:
                await self._listen_once(dsn)
                delay = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning(
                    "API key cache off (every request reads its key) until the database can "
                    "be listened to again: %s",
                    exc,
                )
            finally:
                self.active = False
                self.evict()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _listen_once(self, dsn: str) -> None:
        connection = await asyncpg.connect(dsn, timeout=10)
        lost = asyncio.Event()
        try:
            connection.add_termination_listener(lambda _connection: lost.set())
            await connection.add_listener(KEYS_CHANNEL, self._notified)
            self.evict()  # revocations before LISTEN were not heard
            self.active = True
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), CHECK_S)
                except TimeoutError:
                    await connection.fetchval("SELECT 1", timeout=CHECK_S)
            raise ConnectionError("the LISTEN connection was closed")
        finally:
            self.active = False
            self.evict()
            connection.terminate()

    def _notified(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        self.evict(payload or None)
