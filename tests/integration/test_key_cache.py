"""The API key cache (PostgreSQL): a cached key is not read per request, and a key revoked or
expired by any process, by any path, is refused on the next request, also while the cache's
LISTEN connection is lost. Keys' last use is written (both backends)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import select

from iotmeter.app import create_app
from iotmeter.config import Settings
from iotmeter.db.base import utcnow
from iotmeter.db.engine import Database, build_engine
from iotmeter.db.models import ApiKey
from iotmeter.services.keys import revoke_key
from iotmeter.state import AppState
from tests.conftest import auth_headers, empty_tables, make_settings
from tests.fixtures.waiting import eventually

DEVICES = "/api/v1/devices"


@dataclass
class Running:
    api: httpx.AsyncClient
    anonymous: httpx.AsyncClient
    settings: Settings
    holder: dict[str, AppState] = field(default_factory=dict)

    @property
    def state(self) -> AppState:
        return self.holder["state"]

    async def key(self, role: str = "viewer") -> dict[str, Any]:
        made = await self.api.post("/api/v1/keys", json={"name": "k", "role": role})
        assert made.status_code == 201, made.text
        body: dict[str, Any] = made.json()
        return body

    async def get_as(self, key: str) -> int:
        response = await asyncio.wait_for(
            self.anonymous.get(DEVICES, headers={"Authorization": f"Bearer {key}"}), 10
        )
        return response.status_code


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[Running]:
    holder: dict[str, AppState] = {}

    async def capture(state: AppState) -> None:
        holder["state"] = state
        await asyncio.Event().wait()

    app = create_app(settings, extra_tasks={"capture": capture})
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with (
            httpx.AsyncClient(
                transport=transport,
                base_url="http://iotmeter",
                headers=await auth_headers(settings),
            ) as api,
            httpx.AsyncClient(transport=transport, base_url="http://iotmeter") as anonymous,
        ):
            running = Running(api, anonymous, settings, holder)
            await eventually(
                lambda: asyncio.sleep(0, "state" in holder),
                bool,
                what="the app's state captured",
            )
            yield running


@pytest.fixture
async def pg_app(pg_url: str, tmp_path: Path) -> AsyncIterator[Running]:
    await empty_tables(pg_url)
    async with running_app(make_settings(pg_url, tmp_path)) as running:
        await eventually(
            lambda: asyncio.sleep(0, running.state.key_cache.active),
            bool,
            what="the key cache listening",
        )
        yield running


def plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def test_a_cached_key_is_not_read_per_request(pg_app: Running, pg_url: str) -> None:
    made = await pg_app.key()
    assert await pg_app.get_as(made["key"]) == 200  # read once, now cached
    locker = await asyncpg.connect(plain_dsn(pg_url))
    try:
        transaction = locker.transaction()
        await transaction.start()
        # Nobody can read api_keys until this transaction ends.
        await locker.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        for _ in range(5):
            assert await pg_app.get_as(made["key"]) == 200
        await transaction.rollback()
    finally:
        await locker.close()


async def test_a_key_revoked_by_another_process_is_refused_on_the_next_request(
    pg_app: Running, pg_url: str
) -> None:
    made = await pg_app.key("operator")
    assert await pg_app.get_as(made["key"]) == 200
    other = Database(build_engine(pg_url))  # as `iotmeter keys revoke` elsewhere would
    try:
        async with other.transaction() as session:
            await revoke_key(session, made["key_id"])
    finally:
        await other.close()
    assert await pg_app.get_as(made["key"]) == 401


async def test_a_key_made_unusable_by_plain_sql_is_refused_on_the_next_request(
    pg_app: Running, pg_url: str
) -> None:
    expiring, deleted = await pg_app.key(), await pg_app.key()
    for made in (expiring, deleted):
        assert await pg_app.get_as(made["key"]) == 200
    connection = await asyncpg.connect(plain_dsn(pg_url))
    try:
        await connection.execute(
            "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE key_id = $1",
            expiring["key_id"],
        )
        await connection.execute("DELETE FROM api_keys WHERE key_id = $1", deleted["key_id"])
    finally:
        await connection.close()
    assert await pg_app.get_as(expiring["key"]) == 401
    assert await pg_app.get_as(deleted["key"]) == 401


async def test_while_the_listen_connection_is_lost_keys_are_read_per_request(
    pg_app: Running, pg_url: str
) -> None:
    made = await pg_app.key()
    assert await pg_app.get_as(made["key"]) == 200
    connection = await asyncpg.connect(plain_dsn(pg_url))
    try:
        killed = await connection.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN %iotmeter_api_keys%' AND pid <> pg_backend_pid()"
        )
        assert killed >= 1
        await eventually(
            lambda: asyncio.sleep(0, pg_app.state.key_cache.active),
            lambda active: not active,
            what="the cache off once its connection is gone",
        )
        # A revocation the cache could not hear of.
        await connection.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1", made["key_id"]
        )
    finally:
        await connection.close()
    assert await pg_app.get_as(made["key"]) == 401
    await eventually(
        lambda: asyncio.sleep(0, pg_app.state.key_cache.active),
        bool,
        within=20,
        what="the cache listening again",
    )
    again = await pg_app.key()
    assert await pg_app.get_as(again["key"]) == 200
    assert await pg_app.get_as(made["key"]) == 401


async def test_a_keys_last_use_is_written(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path)
    before = utcnow() - timedelta(seconds=1)
    async with running_app(settings) as running:
        made = await running.key()
        listed = await running.api.get("/api/v1/keys")
        assert (
            next(k for k in listed.json() if k["key_id"] == made["key_id"])["last_used_at"] is None
        )
        assert await running.get_as(made["key"]) == 200
    # Written at the latest when the app stops (every 30 s while it runs).
    database = Database(build_engine(database_url))
    try:
        async with database.transaction() as session:
            used = await session.scalar(
                select(ApiKey.last_used_at).where(ApiKey.key_id == made["key_id"])
            )
    finally:
        await database.close()
    assert used is not None
    assert used.replace(tzinfo=used.tzinfo or UTC) >= before
