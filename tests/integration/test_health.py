"""Liveness, readiness, background task supervision, routing errors, CORS and start-up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from iotmeter.app import BackgroundTask, create_app
from iotmeter.config import Settings
from iotmeter.state import AppState
from tests.conftest import auth_headers, make_settings


@pytest.fixture
def app_tasks(request: pytest.FixtureRequest) -> dict[str, BackgroundTask]:
    """The tasks a test names with `@pytest.mark.parametrize("app_tasks", ..., indirect=True)`."""
    tasks: dict[str, BackgroundTask] = getattr(request, "param", {})
    return tasks


async def crashes(_state: AppState) -> None:
    raise RuntimeError("boom")


async def runs_until_cancelled(_state: AppState) -> None:
    await asyncio.Event().wait()


@asynccontextmanager
async def running(app: FastAPI, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://iotmeter", headers=await auth_headers(settings)
        ) as client:
            yield client


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    error: dict[str, Any] = body["error"]
    return error


async def test_health_answers_ok(api: httpx.AsyncClient) -> None:
    response = await api.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ready_with_the_database_up(api: httpx.AsyncClient, settings: Settings) -> None:
    response = await api.get("/ready")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    expected_dialect = "sqlite" if settings.is_sqlite else "postgresql"
    assert body["backends"]["database"] == {"status": "up", "detail": expected_dialect}
    assert all(item["status"] == "up" for item in body["backends"].values()), body
    # The background tasks of an app without collector: clean-ups, the alert notifier, the
    # keys' last use, and on PostgreSQL the key cache's LISTEN connection.
    expected_tasks = {"housekeeping", "lifecycle", "notifier", "key-use", "metrics-registry"}
    if not settings.is_sqlite:
        expected_tasks.add("key-cache")
    assert set(body["tasks"]) == expected_tasks
    assert all(task["status"] == "up" for task in body["tasks"].values()), body["tasks"]


@pytest.mark.parametrize("app_tasks", [{"exploder": crashes}], indirect=True)
async def test_a_crashed_task_makes_ready_fail_with_its_error(api: httpx.AsyncClient) -> None:
    response = await api.get("/ready")
    for _ in range(100):
        if response.status_code == 503:
            break
        await asyncio.sleep(0.02)
        response = await api.get("/ready")

    assert response.status_code == 503, response.text
    body = response.json()
    assert body["status"] == "not_ready"
    task = body["tasks"]["exploder"]
    assert task["status"] == "down"
    assert "RuntimeError: boom" in task["detail"]
    assert "crash" in task["detail"]
    # The backends are fine: only the task is to blame.
    assert body["backends"]["database"]["status"] == "up"
    # /health only says the process answers.
    assert (await api.get("/health")).status_code == 200


@pytest.mark.parametrize("app_tasks", [{"worker": runs_until_cancelled}], indirect=True)
async def test_a_running_task_shows_up(api: httpx.AsyncClient) -> None:
    await asyncio.sleep(0.05)

    response = await api.get("/ready")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["tasks"]["worker"]["status"] == "up"
    assert "running" in body["tasks"]["worker"]["detail"]


async def test_shutdown_cancels_the_tasks(sqlite_url: str, tmp_path: Path) -> None:
    started = asyncio.Event()
    seen: list[str] = []

    async def waits(state: AppState) -> None:
        seen.append(state.settings.database_url)
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    settings = make_settings(sqlite_url, tmp_path)
    app = create_app(settings, extra_tasks={"waiter": waits})
    async with running(app, settings) as client:
        await asyncio.wait_for(started.wait(), 10)
        ready = await client.get("/ready")
        assert ready.json()["tasks"]["waiter"]["status"] == "up"
        assert seen == [sqlite_url]

    assert seen == [sqlite_url, "cancelled"]


async def test_unknown_route_is_404_in_the_shared_shape(api: httpx.AsyncClient) -> None:
    for path in ("/nope", "/api/v1/nope", "/api/v2/devices"):
        response = await api.get(path)

        assert response.status_code == 404, path
        error = error_of(response)
        assert error["code"] == "not_found"
        assert path in error["message"]


async def test_wrong_method_is_405_in_the_shared_shape(api: httpx.AsyncClient) -> None:
    response = await api.delete("/health")

    assert response.status_code == 405
    error = error_of(response)
    assert error["code"] == "method_not_allowed"
    assert "DELETE" in error["message"]


PREFLIGHT = {"Origin": "http://example.com", "Access-Control-Request-Method": "GET"}


async def test_cors_allows_the_configured_origin(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path, cors_origins=["http://example.com"])
    async with running(create_app(settings), settings) as client:
        preflight = await client.options("/api/v1/devices", headers=PREFLIGHT)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://example.com"

        simple = await client.get("/api/v1/devices", headers={"Origin": "http://example.com"})
        assert simple.status_code == 200
        assert simple.headers["access-control-allow-origin"] == "http://example.com"

        other = await client.options(
            "/api/v1/devices", headers={**PREFLIGHT, "Origin": "http://elsewhere.example"}
        )
        assert "access-control-allow-origin" not in other.headers


async def test_cors_is_off_by_default(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path)
    async with running(create_app(settings), settings) as client:
        preflight = await client.options("/api/v1/devices", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in preflight.headers

        simple = await client.get("/api/v1/devices", headers={"Origin": "http://example.com"})
        assert simple.status_code == 200
        assert "access-control-allow-origin" not in simple.headers


async def test_starts_on_the_embedded_defaults_and_migrates_sqlite_itself(
    tmp_path: Path,
) -> None:
    database = tmp_path / "data" / "x.db"
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{database}",
        archive_dir=tmp_path / "archive",
        auth_bootstrap_file=tmp_path / "admin.key",
        collector_enabled=False,
    )
    assert settings.database_auto_migrate is None
    assert not database.exists()

    async with running(create_app(settings), settings) as client:
        listed = await client.get("/api/v1/devices")
        assert listed.status_code == 200, listed.text
        assert listed.json()["total"] == 0
        created = await client.post(
            "/api/v1/devices", json={"id": "d1", "name": "One", "type": "humidity"}
        )
        assert created.status_code == 201, created.text
        assert (await client.get("/ready")).status_code == 200
    assert database.is_file()

    # A second start on the same file (already at head) keeps the data.
    async with running(create_app(settings), settings) as client:
        devices = (await client.get("/api/v1/devices")).json()
        assert [item["id"] for item in devices["items"]] == ["d1"]
