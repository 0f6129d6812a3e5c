"""The API against a PostgreSQL server that stops and starts again (a private server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from iotmeter.app import create_app
from iotmeter.db.migrate import upgrade_async
from tests.conftest import auth_headers, make_settings
from tests.fixtures.postgres import PrivatePostgres, running_private_postgres

DEVICES = "/api/v1/devices"
READS = (
    f"{DEVICES}/d-1",
    f"{DEVICES}?limit=50",
    f"{DEVICES}/d-1/telemetry?start=-1h&every=1m",
    "/api/v1/alerts",  # a route on the ORM session
)


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    with running_private_postgres() as server:
        yield server


@pytest.fixture
async def api(postgres: PrivatePostgres, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    await upgrade_async(postgres.url)
    settings = make_settings(postgres.url, tmp_path)
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://iotmeter", headers=await auth_headers(settings)
        ) as client:
            yield client


def unavailable(response: httpx.Response) -> dict[str, Any]:
    """The shared error body of a 503; fails on any other answer."""
    assert response.status_code == 503, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    error: dict[str, Any] = body["error"]
    assert error["code"] == "backend_unavailable", body
    return error


async def all_ok(api: httpx.AsyncClient) -> None:
    # Several at once, so the pool holds several connections when the server goes away.
    responses = await asyncio.gather(*(api.get(path) for path in READS * 3))
    for response in responses:
        assert response.status_code == 200, response.text


async def one_device_and_warm_pool(api: httpx.AsyncClient) -> None:
    """Device d-1 registered, and every read route answered (the pool holds connections)."""
    created = await api.post(DEVICES, json={"id": "d-1", "name": "One", "type": "humidity"})
    assert created.status_code == 201, created.text
    await all_ok(api)


async def test_reads_answer_503_while_the_database_is_down_and_recover_after(
    api: httpx.AsyncClient, postgres: PrivatePostgres
) -> None:
    await one_device_and_warm_pool(api)

    await asyncio.to_thread(postgres.stop)
    for path in READS:
        assert "database" in unavailable(await api.get(path))["message"], path
    refused = await api.post(DEVICES, json={"id": "d-2", "name": "Two", "type": "humidity"})
    unavailable(refused)

    await asyncio.to_thread(postgres.start)
    # The pool's connections died with the server: a request may still meet one and get a
    # 503, which makes SQLAlchemy drop the whole pool; from then on every request connects
    # afresh, with no restart of the app.
    first = await api.get(f"{DEVICES}/d-1")
    if first.status_code != 200:
        unavailable(first)
    await all_ok(api)
    assert (await api.get(f"{DEVICES}/d-1")).json()["name"] == "One"
    assert (await api.get(f"{DEVICES}/d-2")).status_code == 404


async def test_a_restart_while_idle_costs_at_most_one_failed_request_per_route(
    api: httpx.AsyncClient, postgres: PrivatePostgres
) -> None:
    await one_device_and_warm_pool(api)

    await asyncio.to_thread(postgres.stop)
    await asyncio.to_thread(postgres.start)

    failed = 0
    for path in READS:
        response = await api.get(path)
        if response.status_code != 200:
            unavailable(response)
            failed += 1
    assert failed <= 1
    await all_ok(api)
