"""The lifecycle task: the time series' partitions, retention and rollups, and the local
archive's expiry, every `IOTMETER_LIFECYCLE_INTERVAL_S`."""

from __future__ import annotations

import asyncio
import logging

from iotmeter.db.engine import is_unavailable
from iotmeter.errors import BackendUnavailable
from iotmeter.state import AppState
from iotmeter.storage.timeseries.base import MaintainedStore
from iotmeter.storage.timeseries.partitions import DAY_US
from iotmeter.storage.timeseries.rollups import system_clock_us

logger = logging.getLogger(__name__)

ARCHIVE_EXPIRY_LIMIT = 1000
"""Archived objects deleted per round at most (the local folder; S3 has a lifecycle rule)."""


async def prepare_lifecycle(state: AppState) -> None:
    """Before ingest starts: partitions for today and ahead, the rollups' state. A database
    that is down now is not fatal: the writer makes a missing day's partition itself."""
    store = state.timeseries
    if not isinstance(store, MaintainedStore):
        return
    try:
        await store.prepare()
    except BackendUnavailable as exc:
        logger.warning("time-series preparation skipped, the store is unavailable: %s", exc)


async def lifecycle_round(state: AppState, *, budget_s: float) -> None:
    """One round: time-series upkeep, then archive expiry."""
    store = state.timeseries
    if isinstance(store, MaintainedStore):
        expired = await store.maintain(budget_s=budget_s)
        if expired:
            logger.info("expired %d time-series rows past their retention", expired)
    days = state.settings.archive_retention_days
    if days:
        cutoff = system_clock_us() - int(days * DAY_US)
        deleted = await state.archive.expire(cutoff, limit=ARCHIVE_EXPIRY_LIMIT)
        if deleted:
            logger.info("deleted %d archived objects past their retention", deleted)


async def run_lifecycle(state: AppState) -> None:
    """Loops until cancelled; a store that is down is tried again next round."""
    interval = state.settings.lifecycle_interval_s
    while True:
        # First round one interval after start: `prepare_lifecycle` did what ingest needs at
        # once. (A round cut off by a shutdown right after start held SQLite's write lock past
        # the app's end in the tests: a cancelled aiosqlite statement finishes in its thread.)
        await asyncio.sleep(interval)
        try:
            await lifecycle_round(state, budget_s=max(1.0, interval / 2))
        except Exception as exc:
            if not (isinstance(exc, BackendUnavailable) or is_unavailable(exc)):
                raise
            logger.warning("lifecycle round skipped, a store is unavailable: %s", exc)
