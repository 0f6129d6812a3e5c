"""Periodic clean-up: dead letters past their retention or beyond their cap, audit log entries
past theirs."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from iotmeter.db.base import utcnow
from iotmeter.db.engine import is_unavailable
from iotmeter.repositories.api_keys import AuditRepository
from iotmeter.repositories.dead_letters import DeadLetterRepository
from iotmeter.state import AppState

logger = logging.getLogger(__name__)

INTERVAL_S = 300.0
"""How often the clean-up runs (and once at start-up)."""


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


async def run_housekeeping(state: AppState) -> None:
    """Loops until cancelled; a database that is down is tried again next time."""
    while True:
        try:
            await expire_dead_letters(state)
            await expire_audit_log(state)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            logger.warning("dead-letter clean-up skipped, the database is unavailable: %s", exc)
        await asyncio.sleep(INTERVAL_S)
