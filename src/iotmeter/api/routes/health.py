"""Liveness and readiness."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from iotmeter.api.auth import Principal, optional_principal
from iotmeter.api.deps import StateDep
from iotmeter.api.schemas import Health, Readiness, ReadinessItem
from iotmeter.errors import BackendUnavailable
from iotmeter.state import HealthCheck

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 3.0


@router.get("/health", summary="The process answers")
async def health() -> Health:
    return Health(status="ok")


async def _check(check: HealthCheck) -> ReadinessItem:
    try:
        detail = await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
    except TimeoutError:
        return ReadinessItem(status="down", detail=f"no answer within {CHECK_TIMEOUT_S:.0f} s")
    except BackendUnavailable as exc:
        return ReadinessItem(status="down", detail=exc.message)
    return ReadinessItem(status="up", detail=detail)


@router.get(
    "/ready",
    summary="Every backend and background task is up",
    responses={503: {"model": Readiness, "description": "Something is down"}},
)
async def ready(
    state: StateDep, principal: Annotated[Principal | None, Depends(optional_principal)]
) -> JSONResponse:
    """200 when every backend answers and every background task runs; 503 otherwise. The
    details (which backend or task, and why) only for a caller with a key (any role)."""
    names = list(state.health_checks)
    results = await asyncio.gather(*(_check(state.health_checks[name]) for name in names))
    backends = dict(zip(names, results, strict=True))
    tasks = {}
    for name, task in state.supervisor.statuses.items():
        if task.healthy:
            tasks[name] = ReadinessItem(status="up", detail=f"{task.state} since {task.started_at}")
        else:
            detail = f"{task.state}"
            if task.last_error:
                detail += f" ({task.crashes} crashes; last: {task.last_error})"
            tasks[name] = ReadinessItem(status="down", detail=detail)
    items = [*backends.values(), *tasks.values()]
    is_ready = all(item.status != "down" for item in items)
    status = "ready" if is_ready else "not_ready"
    code = 200 if is_ready else 503
    if principal is None:
        return JSONResponse({"status": status}, status_code=code)
    body = Readiness(status=status, backends=backends, tasks=tasks)
    return JSONResponse(body.model_dump(mode="json"), status_code=code)
