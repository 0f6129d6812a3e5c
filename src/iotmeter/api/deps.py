"""`Annotated` dependency aliases: routes get the shared clients through these."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.config import Settings
from iotmeter.db.engine import is_unavailable, unavailable
from iotmeter.services import devices, keys
from iotmeter.state import AppState


# Async on purpose: FastAPI runs a plain `def` dependency in a thread pool, a hop per request.
async def get_state(request: Request) -> AppState:
    state: AppState = request.state.iotmeter
    return state


StateDep = Annotated[AppState, Depends(get_state)]

AFTER_COMMIT = "iotmeter.after_commit"
"""`session.info` entry: callables the session dependency calls once the request's transaction
has committed (caches to refresh)."""


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    """One transaction per request: committed on success, rolled back on error; an
    unreachable database is `BackendUnavailable` (503)."""
    async with state.database.sessionmaker() as session:
        try:
            yield session
            await session.commit()
            changed = session.info.pop(devices.CHANGED_DEVICES, None)
            if changed:
                state.devices_changed(changed)
            _after_channel_changes(state, session.info)
            for key_id in session.info.pop(keys.REVOKED_KEYS, ()):
                state.key_cache.evict(key_id)
            for callback in session.info.pop(AFTER_COMMIT, ()):
                callback()
        except BaseException as exc:
            await session.rollback()
            if is_unavailable(exc):
                raise unavailable(exc) from exc
            raise


def _after_channel_changes(state: AppState, info: dict[Any, Any]) -> None:
    """Committed device channel changes reach the parts that act on them."""
    configs = info.pop(devices.CHANGED_CONFIGS, None)
    deleted = info.pop(devices.DELETED_DEVICES, None)
    if state.device_channel is not None:
        if configs:
            state.device_channel.wake(configs)
        if deleted:
            state.device_channel.clear(deleted)
    if info.pop(devices.CREDENTIALS_CHANGED, False):
        state.credentials_changed()
    if info.pop(devices.CERTIFICATES_CHANGED, False) and state.revocations is not None:
        state.revocations.wake()


SettingsDep = Annotated[Settings, Depends(get_settings)]
# scope="function": the transaction commits before the response leaves (FastAPI's default for
# a dependency with `yield` ends it after the response is sent: a client could be told 201 for
# a change whose commit then failed, or read before it committed).
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


async def require_device(state: AppState, device_id: str) -> None:
    """`NotFound` unless the device exists; the connection is returned before the caller goes
    on (a request that held it while the time-series store takes another could exhaust the
    pool under load)."""
    async with state.database.reader() as connection:
        await devices.require_device(connection, device_id)
