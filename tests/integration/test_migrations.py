"""Alembic migrations: up and down on both databases, in step with the models, and packaged."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from iotmeter.db import models  # noqa: F401  (registers every table on Base.metadata)
from iotmeter.db.base import Base
from iotmeter.db.engine import build_engine
from iotmeter.db.migrate import alembic_config, downgrade, upgrade
from iotmeter.storage.timeseries.partitions import is_partition
from tests.fixtures.services import create_pg_database, drop_pg_database

MODEL_TABLES = {table.name for table in Base.metadata.sorted_tables}


@pytest.fixture(params=["postgresql", "sqlite"])
async def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of its own: no tables, not even Alembic's."""
    if request.param == "postgresql":
        url = await create_pg_database()
        try:
            yield url
        finally:
            await drop_pg_database(url)
    else:
        yield f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"


async def inspect_database(url: str) -> tuple[set[str], str | None]:
    """The table names and the Alembic revision the database is at."""

    def read(connection: Connection) -> tuple[set[str], str | None]:
        # The daily partitions of the time series are the app's, not the models'.
        tables = {name for name in inspect(connection).get_table_names() if not is_partition(name)}
        revision = MigrationContext.configure(connection).get_current_revision()
        return tables, revision

    engine = build_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(read)
    finally:
        await engine.dispose()


def head_revision(url: str) -> str:
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None
    return head


def test_the_models_have_tables() -> None:
    # Guards the tests below against comparing two empty sets.
    assert {"devices", "device_configs", "device_alerts"} <= MODEL_TABLES


async def test_upgrade_downgrade_upgrade(fresh_database_url: str) -> None:
    url = fresh_database_url
    tables, revision = await inspect_database(url)
    assert tables == set()
    assert revision is None

    await asyncio.to_thread(upgrade, url)
    tables, revision = await inspect_database(url)
    assert tables == MODEL_TABLES | {"alembic_version"}
    assert revision == head_revision(url)

    await asyncio.to_thread(downgrade, url, "base")
    tables, revision = await inspect_database(url)
    assert tables & MODEL_TABLES == set()
    assert revision is None

    await asyncio.to_thread(upgrade, url)
    tables, revision = await inspect_database(url)
    assert tables == MODEL_TABLES | {"alembic_version"}
    assert revision == head_revision(url)

    # Upgrading a database already at head changes nothing.
    await asyncio.to_thread(upgrade, url)
    assert await inspect_database(url) == (tables, revision)


async def test_every_revision_downgrades_one_step_at_a_time(fresh_database_url: str) -> None:
    url = fresh_database_url
    script = ScriptDirectory.from_config(alembic_config(url))
    revisions = [item.revision for item in script.walk_revisions()]  # head first
    assert len(revisions) >= 2
    await asyncio.to_thread(upgrade, url)
    for index, revision in enumerate(revisions):
        assert (await inspect_database(url))[1] == revision
        target = revisions[index + 1] if index + 1 < len(revisions) else "base"
        await asyncio.to_thread(downgrade, url, target)
    tables, revision = await inspect_database(url)
    assert tables & MODEL_TABLES == set()
    assert revision is None


def _not_a_partition(name: str | None, kind: str, _parents: Any) -> bool:
    return not (kind == "table" and name is not None and is_partition(name))


async def test_models_and_migrations_agree(fresh_database_url: str) -> None:
    url = fresh_database_url
    await asyncio.to_thread(upgrade, url)

    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "compare_server_default": True,
                "include_name": _not_a_partition,
            },
        )
        return list(compare_metadata(context, Base.metadata))

    engine = build_engine(url)
    try:
        async with engine.connect() as connection:
            found = await connection.run_sync(differences)
    finally:
        await engine.dispose()
    assert found == []


@pytest.fixture(scope="module")
def unpacked_wheel(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel and unpacked: what `pip install` would put on the path."""
    wheels = tmp_path_factory.mktemp("wheel")
    # The build backend's PEP 517 hook, as pip or uv would call it (the venv may have no pip).
    built = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, hatchling.build as b; b.build_wheel(sys.argv[1])",
            str(wheels),
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("iotmeter-*.whl")
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def test_migrations_run_from_the_installed_package(unpacked_wheel: Path, tmp_path: Path) -> None:
    assert (unpacked_wheel / "iotmeter" / "_migrations" / "env.py").is_file()
    database = tmp_path / "w.db"
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(unpacked_wheel),
        "IOTMETER_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
    }
    script = (
        "import iotmeter, iotmeter.db.migrate as m\n"
        "from iotmeter.__main__ import main\n"
        "print('module', iotmeter.__file__)\n"
        "print('scripts', m.migrations_dir())\n"
        "raise SystemExit(main(['migrate']))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    printed = dict(line.split(" ", 1) for line in result.stdout.splitlines()[:2])
    assert Path(printed["module"]).is_relative_to(unpacked_wheel)
    assert Path(printed["scripts"]) == unpacked_wheel / "iotmeter" / "_migrations"
    assert "schema at head" in result.stdout
    assert database.is_file()
    with contextlib.closing(sqlite3.connect(database)) as connection:
        tables = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        (revision,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    assert tables >= MODEL_TABLES | {"alembic_version"}
    assert revision == head_revision(f"sqlite+aiosqlite:///{database}")
    assert list(workdir.iterdir()) == []


async def test_downgrading_the_device_channel_keeps_devices_and_their_configs(
    fresh_database_url: str,
) -> None:
    """On SQLite a table rebuild of `devices` would cascade-delete every row referring to it."""
    url = fresh_database_url
    await asyncio.to_thread(upgrade, url)
    engine = build_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO devices (id, name, type, metadata, status, created_at, "
                    "updated_at) VALUES ('d1', 'D', 'power', '{}', 'active', "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            await connection.execute(
                text(
                    "INSERT INTO device_configs (device_id, key, value, updated_at) "
                    "VALUES ('d1', 'k', '1', CURRENT_TIMESTAMP)"
                )
            )
        await asyncio.to_thread(downgrade, url, "0006")
        async with engine.connect() as connection:
            devices = (await connection.execute(text("SELECT count(*) FROM devices"))).scalar()
            configs = (
                await connection.execute(text("SELECT count(*) FROM device_configs"))
            ).scalar()
        assert (devices, configs) == (1, 1)
        await asyncio.to_thread(upgrade, url)
    finally:
        await engine.dispose()
