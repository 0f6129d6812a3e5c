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

from iotmeter.app import BackgroundTask, create_app
from iotmeter.config import Settings
from iotmeter.db.base import Base
from iotmeter.db.engine import build_engine
from iotmeter.db.migrate import upgrade_async
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
async def api(
    settings: Settings, app_tasks: dict[str, BackgroundTask]
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the app, with its real lifespan running."""
    app = create_app(settings, extra_tasks=app_tasks)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://iotmeter") as client:
            yield client


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
