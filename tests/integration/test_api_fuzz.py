"""The API under schemathesis (every check), on PostgreSQL and SQLite, authenticated, for a fixed
time budget per backend: any finding fails the test, with schemathesis' own report of it.

The app runs as a real server (`iotmeter serve`), so the fuzzer also goes through uvicorn, the
request guard and the audit log, as a client would. `IOTMETER_TEST_FUZZ_SECONDS` sets the budget
(60 s by default)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.delivery import AppProcess, app_environment

FUZZ_SECONDS = os.environ.get("IOTMETER_TEST_FUZZ_SECONDS", "60")
SCHEMATHESIS = Path(sys.executable).parent / "st"


@pytest.fixture(params=["postgresql", "sqlite"])
async def served(
    request: pytest.FixtureRequest, empty_pg_url: str, tmp_path: Path
) -> AsyncIterator[AppProcess]:
    database_url = (
        empty_pg_url
        if request.param == "postgresql"
        else f"sqlite+aiosqlite:///{tmp_path / 'fuzz.db'}"
    )
    env = app_environment(
        database_url=database_url,
        mqtt_url="mqtt://127.0.0.1:1",
        workdir=tmp_path,
        client_id="fuzz",
        IOTMETER_COLLECTOR_ENABLED="false",
        IOTMETER_LOG_LEVEL="WARNING",
    )
    app = AppProcess(env, tmp_path)
    try:
        await app.start(wait="health")
        # Some data for the fuzzer to find: a device with a config key, an alert.
        async with httpx.AsyncClient(base_url=app.base_url, headers=app.headers) as client:
            device = {"id": "dev-1", "name": "Dev", "type": "humidity"}
            assert (await client.post("/api/v1/devices", json=device)).status_code == 201
            await client.put("/api/v1/devices/dev-1/configs/k", json={"value": 1})
            await client.post(
                "/api/v1/alerts", json={"device_id": "dev-1", "severity": "info", "message": "m"}
            )
        yield app
    finally:
        app.close()


async def test_schemathesis_finds_nothing(served: AppProcess, tmp_path: Path) -> None:
    key = served.headers["Authorization"]
    command = [
        str(SCHEMATHESIS),
        "--config-file",
        str(Path(__file__).parents[1] / "schemathesis.toml"),
        "run",
        f"{served.base_url}/openapi.json",
        "--checks",
        "all",
        # An event stream never ends, so every call would be a timeout: tests/e2e/test_live.py
        # sends it bad input and reads its events instead.
        "--exclude-path",
        "/api/v1/live",
        "--header",
        f"Authorization: {key}",
        "--max-time",
        FUZZ_SECONDS,
        "--seed",
        "20261130",
        "--request-timeout",
        "10",
        "--no-color",
    ]
    result = await asyncio.to_thread(
        subprocess.run,
        command,
        capture_output=True,
        text=True,
        timeout=float(FUZZ_SECONDS) + 240,
        check=False,
        cwd=tmp_path,
    )
    report = result.stdout[-20000:] + result.stderr[-5000:]
    assert result.returncode == 0, f"schemathesis found failures:\n{report}"
    assert "Test cases:" in result.stdout or "passed" in result.stdout, report
