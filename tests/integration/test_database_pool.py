"""The PostgreSQL connection pool: a fixed number of connections; a request beyond them waits."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.pool import AsyncAdaptedQueuePool

from iotmeter.db.engine import Database, build_engine
from iotmeter.errors import BackendUnavailable


async def test_a_checkout_beyond_the_pool_waits_for_a_connection(pg_url: str) -> None:
    database = Database(build_engine(pg_url, pool_size=2, pool_timeout_s=10))
    pool = database.engine.pool
    assert isinstance(pool, AsyncAdaptedQueuePool)
    try:
        in_use: list[int] = []

        async def query() -> None:
            async with database.reader() as connection:
                await connection.execute(text("SELECT pg_sleep(0.05)"))
                in_use.append(pool.checkedout())

        await asyncio.gather(*(query() for _ in range(10)))

        # All ran; the ones that found both connections busy waited rather than open more.
        assert len(in_use) == 10
        assert max(in_use) == 2
        assert pool.checkedin() == 2
    finally:
        await database.close()


async def test_a_pool_busy_for_too_long_is_a_503_naming_the_setting(pg_url: str) -> None:
    database = Database(build_engine(pg_url, pool_size=1, pool_timeout_s=0.2))
    try:
        async with database.reader() as held:
            await held.execute(text("SELECT 1"))
            with pytest.raises(BackendUnavailable) as caught:
                async with database.reader() as other:
                    await other.execute(text("SELECT 1"))
        assert caught.value.status_code == 503
        assert "IOTMETER_DATABASE_POOL_SIZE" in caught.value.message

        async with database.reader() as connection:  # returned: usable again
            assert await connection.scalar(text("SELECT 1")) == 1
    finally:
        await database.close()
