"""Request ids: every answer carries `X-Request-ID` (the client's when it is sane), refusals and
errors too, and so does every log line written while the request is served."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from iotmeter.app import create_app
from iotmeter.logging import configure_logging
from tests.conftest import auth_headers, make_settings

GENERATED = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
def json_logging() -> Iterator[None]:
    yield
    # The app made the process's handler write JSON: back to what other tests expect.
    configure_logging("INFO", "console")


@pytest.fixture
async def client(
    sqlite_url: str, tmp_path: Path, json_logging: None
) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        sqlite_url,
        tmp_path,
        log_format="json",
        log_repeat_window_s=0,  # every test's "unhandled error" line, not one a minute
        http_max_body_bytes=1024,
    )
    app = create_app(settings)
    assert isinstance(app, FastAPI)
    log = logging.getLogger("iotmeter.tests.request_id")

    async def logs_something() -> dict[str, str]:
        log.warning("inside the request", extra={"device_id": "dev-7"})
        return {"ok": "yes"}

    async def fails() -> None:
        raise RuntimeError("an unexpected failure")

    app.add_api_route("/test/log", logs_something)
    app.add_api_route("/test/fail", fails)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://iotmeter") as api:
            api.headers.update(await auth_headers(settings))
            yield api


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_the_clients_id_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.get("/health", headers={"X-Request-ID": "trace-7.a:b_c-d"})
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "trace-7.a:b_c-d"


async def test_an_id_is_made_when_there_is_none(client: httpx.AsyncClient) -> None:
    first = (await client.get("/health")).headers["X-Request-ID"]
    second = (await client.get("/health")).headers["X-Request-ID"]
    assert GENERATED.match(first)
    assert GENERATED.match(second)
    assert first != second


@pytest.mark.parametrize(
    "sent",
    ["", "has space", "x" * 129, "semi;colon", "new\tline", "ünïcode", "a/b"],
    ids=["empty", "space", "too-long", "semicolon", "tab", "non-ascii", "slash"],
)
async def test_an_id_a_log_reader_should_not_trust_is_replaced(
    client: httpx.AsyncClient, sent: str
) -> None:
    response = await client.get("/health", headers={"X-Request-ID": sent.encode()})
    assert GENERATED.match(response.headers["X-Request-ID"]), response.headers["X-Request-ID"]


async def test_the_longest_accepted_id_is_kept(client: httpx.AsyncClient) -> None:
    sent = "x" * 128
    assert (await client.get("/health", headers={"X-Request-ID": sent})).headers[
        "X-Request-ID"
    ] == sent


async def test_refusals_and_errors_carry_the_id(client: httpx.AsyncClient) -> None:
    headers = {"X-Request-ID": "req-refused"}
    unauthenticated = await client.get(
        "/api/v1/devices", headers={**headers, "Authorization": "Bearer nope"}
    )
    missing = await client.get("/no/such/route", headers=headers)
    too_large = await client.post("/api/v1/devices", content=b"x" * 2048, headers=headers)
    failed = await client.get("/test/fail", headers=headers)

    assert [unauthenticated.status_code, missing.status_code, too_large.status_code] == [
        401,
        404,
        413,
    ]
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "internal_error"
    for response in (unauthenticated, missing, too_large, failed):
        assert response.headers.get_list("X-Request-ID") == ["req-refused"], response


async def test_log_lines_of_a_request_carry_its_id(
    client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    response = await client.get("/test/log", headers={"X-Request-ID": "req-log-1"})
    failed = await client.get("/test/fail", headers={"X-Request-ID": "req-fail-1"})
    assert response.status_code == 200
    assert failed.status_code == 500

    lines = json_lines(capsys.readouterr().err)
    inside = [line for line in lines if line["message"] == "inside the request"]
    assert len(inside) == 1
    assert inside[0]["request_id"] == "req-log-1"
    assert inside[0]["device_id"] == "dev-7"
    assert inside[0]["level"] == "WARNING"
    unhandled = [line for line in lines if line["message"] == "unhandled error"]
    assert len(unhandled) == 1
    assert unhandled[0]["request_id"] == "req-fail-1"
    assert "RuntimeError: an unexpected failure" in unhandled[0]["exc_info"]
