"""Shared fixtures: real PostgreSQL and SQLite databases, settings, and the API client."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from starlette.types import ASGIApp

from iotmeter.app import BackgroundTask, create_app
from iotmeter.config import Settings
from iotmeter.db.base import Base
from iotmeter.db.engine import Database, build_engine
from iotmeter.db.migrate import upgrade_async
from iotmeter.services.keys import create_key
from tests.fixtures.s3 import seaweedfs
from tests.fixtures.services import create_pg_database, drop_pg_database

__all__ = ["seaweedfs"]  # one SeaweedFS per session, started when a test first asks

# Tests must never read a developer's own IOTMETER_* settings by accident.
for _name in [name for name in os.environ if name.startswith("IOTMETER_") and "TEST" not in name]:
    del os.environ[_name]


@pytest.fixture(scope="session")
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for the run, migrated to head; dropped afterwards."""
    url = await create_pg_database()
    await upgrade_async(url)
    yield url
    await drop_pg_database(url)


@pytest.fixture(scope="session")
async def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("sqlite") / "iotmeter.db"
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade_async(url)
    return url


async def empty_tables(url: str) -> None:
    engine = build_engine(url)
    try:
        async with engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                await connection.execute(text(f"DELETE FROM {table.name}"))
    finally:
        await engine.dispose()


@pytest.fixture
async def own_pg_database() -> AsyncIterator[Database]:
    """A migrated PostgreSQL database of the test's own (it creates and drops partitions)."""
    url = await create_pg_database()
    database = None
    try:
        await upgrade_async(url)
        database = Database(build_engine(url))
        yield database
    finally:
        if database is not None:
            await database.close()
        await drop_pg_database(url)


@pytest.fixture
async def empty_pg_url(pg_url: str) -> str:
    """The run's PostgreSQL database with every table emptied first (test isolation)."""
    await empty_tables(pg_url)
    return pg_url


@pytest.fixture(params=["postgresql", "sqlite"])
async def database_url(request: pytest.FixtureRequest, pg_url: str, sqlite_url: str) -> str:
    """Each test using this runs once on PostgreSQL and once on SQLite, on empty tables."""
    url = pg_url if request.param == "postgresql" else sqlite_url
    await empty_tables(url)
    return url


def make_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a test: its database, its own archive folder, no background tasks."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "database_auto_migrate": False,
        "archive_dir": tmp_path / "archive",
        "spool_dir": tmp_path / "spool",
        "auth_bootstrap_file": tmp_path / "admin.key",
        "collector_enabled": False,
        "simulator_enabled": False,
        "log_level": "DEBUG",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, tmp_path)


@pytest.fixture
def app_tasks() -> dict[str, BackgroundTask]:
    """Background tasks to start with the app (override in a test module)."""
    return {}


@pytest.fixture
async def asgi_app(
    settings: Settings, app_tasks: dict[str, BackgroundTask]
) -> AsyncIterator[ASGIApp]:
    """The app with its real lifespan running."""
    app = create_app(settings, extra_tasks=app_tasks)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        yield manager.app


@pytest.fixture
async def api(asgi_app: ASGIApp, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the app holding the admin key the app made at its first start."""
    transport = httpx.ASGITransport(app=asgi_app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://iotmeter", headers=await auth_headers(settings)
    ) as client:
        yield client


async def auth_headers(settings: Settings) -> dict[str, str]:
    """`Authorization` with an admin key: the one the app wrote at its first start, or, when
    the database already held keys (a database shared by tests), a new one made for the test.
    None with auth off."""
    if settings.auth == "off":
        return {}
    path = settings.auth_bootstrap_file
    if not path.exists():
        database = Database(build_engine(settings.database_url))
        try:
            async with database.transaction() as session:
                _row, key = await create_key(session, name="test", role="admin", expires_at=None)
        finally:
            await database.close()
        path.write_text(key)
    return {"Authorization": f"Bearer {path.read_text().strip()}"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
