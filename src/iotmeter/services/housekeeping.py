"""Periodic clean-up: dead letters past their retention or beyond their cap, audit log entries
and resolved alerts past theirs."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from iotmeter.db.base import utcnow
from iotmeter.db.engine import is_unavailable
from iotmeter.repositories.alerts import AlertRepository
from iotmeter.repositories.api_keys import AuditRepository
from iotmeter.repositories.dead_letters import DeadLetterRepository
from iotmeter.state import AppState

logger = logging.getLogger(__name__)

INTERVAL_S = 300.0
"""How often the clean-up runs (and once at start-up)."""
ALERT_DELETE_CHUNK = 10_000
"""Resolved alerts deleted per statement, each in its own transaction: a large backlog (the
first run after the setting is lowered) never holds one long transaction or lock."""


async def expire_dead_letters(state: AppState) -> int:
    """Delete dead letters older than `IOTMETER_DEAD_LETTER_RETENTION_DAYS` and the oldest
    beyond `IOTMETER_DEAD_LETTER_MAX_ROWS`; the number deleted."""
    settings = state.settings
    async with state.database.transaction() as session:
        deleted = await DeadLetterRepository(session).expire(
            older_than=utcnow() - timedelta(days=settings.dead_letter_retention_days),
            keep_newest=settings.dead_letter_max_rows,
        )
    if deleted:
        logger.info("deleted %d dead letters past their retention or cap", deleted)
    return deleted


async def expire_audit_log(state: AppState) -> int:
    """Delete audit entries older than `IOTMETER_AUDIT_RETENTION_DAYS`; the number deleted."""
    cutoff = utcnow() - timedelta(days=state.settings.audit_retention_days)
    async with state.database.transaction() as session:
        return await AuditRepository(session).expire(cutoff)


async def expire_resolved_alerts(
    state: AppState, *, now: datetime | None = None, chunk_size: int = ALERT_DELETE_CHUNK
) -> int:
    """Delete alerts resolved more than `IOTMETER_RESOLVED_ALERT_RETENTION_DAYS` before `now`
    (0: keep them forever), `chunk_size` per transaction; the number deleted."""
    days = state.settings.resolved_alert_retention_days
    if days <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=days)
    deleted = 0
    while True:
        async with state.database.transaction() as session:
            count = await AlertRepository(session).delete_resolved_before(cutoff, limit=chunk_size)
        deleted += count
        if count < chunk_size:
            break
        await asyncio.sleep(0)  # between chunks, let requests and ingest have the loop
    if deleted:
        logger.info("deleted %d alerts resolved before %s", deleted, cutoff.isoformat())
    return deleted


async def run_housekeeping(state: AppState) -> None:
    """Loops until cancelled; a database that is down is tried again next time."""
    while True:
        try:
            await expire_dead_letters(state)
            await expire_audit_log(state)
            await expire_resolved_alerts(state)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            logger.warning("clean-up skipped, the database is unavailable: %s", exc)
        await asyncio.sleep(INTERVAL_S)
