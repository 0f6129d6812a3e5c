"""Supervision of the long-running background tasks (collector, simulator, ...)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from iotmeter.db.base import utcnow
from iotmeter.retry import Backoff

logger = logging.getLogger(__name__)

TaskFactory = Callable[[], Coroutine[Any, Any, None]]
TaskState = Literal["starting", "running", "crashed", "finished", "stopped"]
STOP_TIMEOUT_S = 5.0
"""Every task stops within this long of shutdown, whatever it was doing."""


@dataclass
class TaskStatus:
    """What `/ready` shows of one background task."""

    name: str
    state: TaskState = "starting"
    started_at: datetime | None = None
    crashes: int = 0
    last_error: str | None = None
    last_crash_at: datetime | None = None
    restart_at: datetime | None = field(default=None, repr=False)

    @property
    def healthy(self) -> bool:
        return self.state in ("starting", "running")


class TaskSupervisor:
    """Runs named tasks; a crash is logged, shown in the status and retried with the project's
    backoff (`iotmeter.retry`).

    A task is expected to loop until cancelled. If its coroutine returns, it is marked
    `finished` and not restarted; if it raises, it is `crashed` until the backoff delay
    has passed and a fresh coroutine is running again.
    """

    def __init__(
        self,
        *,
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        stop_timeout: float = STOP_TIMEOUT_S,
    ) -> None:
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._stop_timeout = stop_timeout
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.statuses: dict[str, TaskStatus] = {}

    def start(self, name: str, factory: TaskFactory) -> None:
        if name in self._tasks:
            raise ValueError(f"a task named {name!r} is already supervised")
        status = TaskStatus(name=name)
        self.statuses[name] = status
        self._tasks[name] = asyncio.create_task(self._supervise(status, factory), name=name)

    async def _supervise(self, status: TaskStatus, factory: TaskFactory) -> None:
        backoff = Backoff(
            f"background task {status.name}",
            initial=self._initial_backoff,
            cap=self._max_backoff,
            log=logger,
            context={"task": status.name},
        )
        while True:
            status.state = "running"
            status.started_at = utcnow()
            started = time.monotonic()
            try:
                await factory()
            except asyncio.CancelledError:
                status.state = "stopped"
                raise
            except Exception as exc:
                status.state = "crashed"
                status.crashes += 1
                status.last_error = f"{type(exc).__name__}: {exc}"
                status.last_crash_at = utcnow()
                if time.monotonic() - started > self._max_backoff:
                    backoff.succeeded()  # it ran well for a while: start from the first delay
                delay = backoff.next_delay(exc)
                logger.exception(
                    "background task %s crashed (%d so far); restarting in %.1f s",
                    status.name,
                    status.crashes,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            status.state = "finished"
            logger.info("background task %s finished", status.name)
            return

    async def stop(self) -> None:
        """Cancel every task and wait (a few seconds at most) for each to finish its clean-up."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=self._stop_timeout)
            for task in pending:
                logger.error(
                    "background task %s did not stop within %.0f s of being cancelled; "
                    "leaving it behind",
                    task.get_name(),
                    self._stop_timeout,
                )
            for task in done:
                if task.cancelled():
                    continue
                error = task.exception()
                if error is not None:
                    logger.error(
                        "background task %s failed while stopping: %r", task.get_name(), error
                    )
        for status in self.statuses.values():
            if status.state in ("starting", "running", "crashed"):
                status.state = "stopped"
        self._tasks.clear()
