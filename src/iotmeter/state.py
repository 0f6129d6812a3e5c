"""The typed state the lifespan builds and every route and task shares."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from iotmeter.config import Settings
from iotmeter.db.engine import Database
from iotmeter.runtime import TaskSupervisor

HealthCheck = Callable[[], Awaitable[str | None]]
"""Returns a short detail when the backend is up; raises `BackendUnavailable` when not."""


@dataclass
class AppState:
    settings: Settings
    database: Database
    supervisor: TaskSupervisor
    health_checks: dict[str, HealthCheck] = field(default_factory=dict)
