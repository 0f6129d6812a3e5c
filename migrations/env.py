"""Alembic environment: runs migrations through the async engine on PostgreSQL or SQLite."""

from __future__ import annotations

import asyncio
import logging.config

from alembic import context
from sqlalchemy.engine import Connection

from iotmeter.config import load_settings
from iotmeter.db import models  # noqa: F401  (registers the tables)
from iotmeter.db.base import Base
from iotmeter.db.engine import build_engine
from iotmeter.storage.timeseries.partitions import is_partition

config = context.config
if config.config_file_name is not None:
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    return url if url else load_settings().database_url


def _not_a_partition(name: str | None, kind: str, _parents: object) -> bool:
    """The time series' daily partitions are made by the app, not by the models."""
    return not (kind == "table" and name is not None and is_partition(name))


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_name=_not_a_partition,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = build_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
