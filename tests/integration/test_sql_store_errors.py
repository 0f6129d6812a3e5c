"""asyncpg's own errors (the PostgreSQL write goes to the driver directly) leave the SQL
time-series store as the project's errors: the runner then retries quietly instead of logging
a traceback on every try (issue 9)."""

from __future__ import annotations

import pytest

from iotmeter.db.engine import Database, build_engine
from iotmeter.errors import BackendUnavailable
from iotmeter.storage.timeseries.sql import SqlTimeSeriesStore
from tests.fixtures.readings import reading
from tests.fixtures.services import create_pg_database, drop_pg_database


async def test_a_missing_table_is_an_outage_that_names_the_fix() -> None:
    url = await create_pg_database("iotmeter_unmigrated")
    database = Database(build_engine(url))
    try:
        store = SqlTimeSeriesStore(database)
        with pytest.raises(BackendUnavailable, match="iotmeter migrate") as caught:
            await store.write([reading("dev-1", 1_795_000_000_000_000, {"t": 1.0})])
        assert "UndefinedTableError" in caught.value.message
    finally:
        await database.close()
        await drop_pg_database(url)
