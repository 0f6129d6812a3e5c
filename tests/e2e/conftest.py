"""Fixtures for end-to-end tests: the whole app, MQTT in, API out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
from asgi_lifespan import LifespanManager

from iotmeter.app import create_app
from iotmeter.config import Settings
from tests.conftest import auth_headers
from tests.fixtures.services import Mosquitto, running_mosquitto
from tests.fixtures.waiting import eventually


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    with running_mosquitto() as broker:
        yield broker


@asynccontextmanager
async def start_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its real lifespan, once `/ready` says 200."""
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://iotmeter", headers=await auth_headers(settings)
        ) as client:
            await eventually(
                lambda: client.get("/ready"),
                lambda response: response.status_code == 200,
                what="app ready (collector subscribed)",
            )
            yield client
