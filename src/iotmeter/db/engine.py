"""The async engine and session factory shared by the API and the background tasks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from iotmeter.config import env_name, normalize_database_url
from iotmeter.errors import BackendUnavailable


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # SQLite ignores ON DELETE CASCADE unless asked on every connection.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed transaction survives a power cut (NORMAL in WAL mode may lose the
    # last ones), which the collector relies on before it frees the spool's copy. It costs
    # one fsync of the WAL per commit: one per batch of up to 5,000 messages.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def build_engine(url: str, *, pool_size: int = 30, pool_timeout_s: float = 10.0) -> AsyncEngine:
    """Create the engine; for SQLite, also create the file's folder.

    PostgreSQL: at most `pool_size` connections, all kept open; a checkout beyond them waits
    up to `pool_timeout_s` for one to come back (then 503). No overflow: SQLAlchemy closes an
    overflow connection as soon as it is returned, so with the event loop busy (a request
    holds its connection until it runs again) overflow meant connecting and disconnecting
    all the time, a server process and a TLS attempt each, where waiting costs nothing.

    No pre-ping: it would cost a round trip (three outside a transaction) on every checkout.
    After a PostgreSQL restart the first statement on each stale connection fails instead;
    SQLAlchemy then invalidates the whole pool, so later checkouts connect afresh, and the
    failed request answers 503 (`backend_unavailable`).
    """
    url = normalize_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, hide_parameters=True)
        event.listen(engine.sync_engine, "connect", _configure_sqlite)
        return engine
    # hide_parameters: a failed statement's error (logged) would list its bound values, a
    # webhook's signing secret or a credential hash among them.
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=pool_timeout_s,
        hide_parameters=True,
    )


def is_unavailable(exc: BaseException) -> bool:
    """Whether a database error means the server is unreachable or every pooled connection
    is busy (not a bad statement)."""
    if isinstance(exc, (OperationalError, InterfaceError, OSError, PoolTimeout)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def unavailable(exc: BaseException) -> BackendUnavailable:
    """The project's 503 for a database that cannot be reached."""
    if isinstance(exc, PoolTimeout):
        return BackendUnavailable(
            f"database busy: no pooled connection came free in time "
            f"({env_name('database_pool_size')}); try again"
        )
    orig = getattr(exc, "orig", None) or exc
    detail = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return BackendUnavailable(f"database unavailable, try again: {detail}")


class Database:
    """Owns the engine; hands out sessions (one transaction each)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
        # Shares the pool; each checkout only flips the driver's autocommit flag (no round trip).
        self.autocommit_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        """For reads: a lone SELECT needs no BEGIN/COMMIT around it."""

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session that commits when the block succeeds and rolls back when it raises."""
        async with self.sessionmaker() as session, session.begin():
            yield session

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads in autocommit: a lone SELECT costs one round trip, with no
        BEGIN/COMMIT around it. An unreachable database is `BackendUnavailable`."""
        try:
            async with self.autocommit_engine.connect() as connection:
                yield connection
        except (DBAPIError, OSError, PoolTimeout) as exc:
            if is_unavailable(exc):
                raise unavailable(exc) from exc
            raise

    async def ping(self) -> None:
        try:
            async with self.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except (OperationalError, DBAPIError, OSError) as exc:
            raise BackendUnavailable(f"database unreachable: {exc}") from exc

    async def close(self) -> None:
        await self.engine.dispose()
