"""Authentication, roles, keys, the audit log and browser defences, on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import select, update
from starlette.types import ASGIApp

from iotmeter.api.auth import needed_role
from iotmeter.app import create_app
from iotmeter.config import Settings
from iotmeter.db.base import utcnow
from iotmeter.db.engine import Database, build_engine
from iotmeter.db.models import ApiKey
from iotmeter.security.keys import Role
from tests.conftest import auth_headers, empty_tables, make_settings

DEVICES = "/api/v1/devices"
DEVICE = {"id": "dev-1", "name": "Dev", "type": "humidity"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def anonymous(asgi_app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    """The same app, no credentials."""
    transport = httpx.ASGITransport(app=asgi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://iotmeter") as client:
        yield client


async def make_key(api: httpx.AsyncClient, role: str, **fields: Any) -> dict[str, Any]:
    response = await api.post("/api/v1/keys", json={"name": f"{role} key", "role": role, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    database = Database(build_engine(settings.database_url))
    yield database
    await database.close()


# --- without credentials -----------------------------------------------------------------------


async def test_every_api_route_refuses_a_caller_without_credentials(
    anonymous: httpx.AsyncClient,
) -> None:
    paths = (await anonymous.get("/openapi.json")).json()["paths"]
    operations = [
        (method.upper(), path)
        for path, methods in paths.items()
        if path.startswith("/api/v1")
        for method in methods
    ]
    assert len(operations) >= 25
    for method, template in operations:
        path = template.replace("/raw/{key}", "/raw/dev-1/x.json").replace("{key}", "k")
        for name in ("device_id", "key_id", "alert_id", "letter_id"):
            path = path.replace("{" + name + "}", "1")
        response = await anonymous.request(method, path, json={})
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "API key" in response.json()["error"]["message"]


async def test_health_and_docs_are_public_and_ready_tells_the_public_only_its_state(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    assert (await anonymous.get("/health")).json() == {"status": "ok"}
    public = await anonymous.get("/ready")
    assert public.status_code == 200
    assert public.json() == {"status": "ready"}
    detailed = (await api.get("/ready")).json()
    assert detailed["status"] == "ready"
    assert "database" in detailed["backends"]
    assert (await anonymous.get("/docs")).status_code == 200
    schema = (await anonymous.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer"
    assert schemes["apiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An API key.",
    }
    device_get = schema["paths"]["/api/v1/devices/{device_id}"]["get"]
    assert {"bearer": []} in device_get["security"]


async def test_a_cross_site_form_post_cannot_act(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    """What a foreign page can send (text/plain, cookies if any): no key, no effect."""
    created = await api.post("/api/v1/alerts", json=await _alert_body(api))
    alert_id = created.json()["id"]
    anonymous.cookies.set("session", "anything")
    response = await anonymous.post(
        f"/api/v1/alerts/{alert_id}/resolve",
        content=b"x",
        headers={"Content-Type": "text/plain", "Origin": "http://evil.example"},
    )
    assert response.status_code == 401
    assert "access-control-allow-origin" not in response.headers
    assert (await api.get(f"/api/v1/alerts/{alert_id}")).json()["status"] == "active"


async def _alert_body(api: httpx.AsyncClient) -> dict[str, Any]:
    await api.post(DEVICES, json=DEVICE)
    return {"device_id": "dev-1", "severity": "critical", "message": "hot"}


# --- keys and roles ----------------------------------------------------------------------------


async def test_the_first_start_writes_an_admin_key_readable_by_its_owner_only(
    api: httpx.AsyncClient, settings: Settings, database: Database
) -> None:
    path = settings.auth_bootstrap_file
    key = path.read_text().strip()
    assert key.startswith("iotm_")
    assert len(key) >= 60
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    async with database.transaction() as session:
        rows = (await session.scalars(select(ApiKey))).all()
    assert [(row.name, row.role) for row in rows] == [("bootstrap-admin", "admin")]
    assert rows[0].secret_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in {rows[0].secret_hash, rows[0].key_id, rows[0].name}


async def test_the_start_up_log_names_the_file_never_the_key(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await empty_tables(sqlite_url)
    settings = make_settings(sqlite_url, tmp_path)
    with caplog.at_level(logging.INFO):
        async with LifespanManager(create_app(settings)):
            pass
    key = settings.auth_bootstrap_file.read_text().strip()
    assert str(settings.auth_bootstrap_file.resolve()) in caplog.text
    assert key not in caplog.text
    assert key.split("_", 2)[2] not in caplog.text


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        ("viewer", {"read": True, "write": False, "keys": False}),
        ("operator", {"read": True, "write": True, "keys": False}),
        ("admin", {"read": True, "write": True, "keys": True}),
    ],
)
async def test_each_role_can_do_what_it_may_and_no_more(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient, role: str, allowed: dict[str, bool]
) -> None:
    key = (await make_key(api, role))["key"]
    headers = bearer(key)
    read = await anonymous.get(DEVICES, headers=headers)
    write = await anonymous.post(DEVICES, json=DEVICE, headers=headers)
    keys = await anonymous.get("/api/v1/keys", headers=headers)
    audit = await anonymous.get("/api/v1/audit", headers=headers)
    assert (read.status_code == 200) is allowed["read"]
    assert write.status_code == (201 if allowed["write"] else 403), write.text
    assert keys.status_code == (200 if allowed["keys"] else 403)
    assert audit.status_code == (200 if allowed["keys"] else 403)
    if not allowed["write"]:
        assert f"the credentials have {role}" in write.json()["error"]["message"]
        assert (await api.get(f"{DEVICES}/dev-1")).status_code == 404


async def test_x_api_key_works_like_bearer(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    key = (await make_key(api, "viewer"))["key"]
    assert (await anonymous.get(DEVICES, headers={"X-API-Key": key})).status_code == 200


@pytest.mark.parametrize(
    "credentials",
    [
        "iotm_000000000000_" + "A" * 43,
        "not-a-key",
        "iotm_",
        "Bearer",
        "a.b.c",
        "x" * 5000,
    ],
)
async def test_a_wrong_key_is_401_whatever_its_shape(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient, credentials: str
) -> None:
    response = await anonymous.get(DEVICES, headers=bearer(credentials))
    assert response.status_code == 401, response.text
    assert (await anonymous.get(DEVICES, headers={"X-API-Key": credentials})).status_code == 401


async def test_a_tampered_key_with_a_real_key_id_is_refused(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    key = (await make_key(api, "admin"))["key"]
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert (await anonymous.get(DEVICES, headers=bearer(tampered))).status_code == 401


async def test_a_key_is_shown_once_and_listed_without_it(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/v1/keys", json={"name": "grafana", "role": "viewer"})
    assert response.headers["cache-control"] == "no-store"
    created = response.json()
    listing = await api.get("/api/v1/keys")
    assert created["key"] not in listing.text
    mine = next(item for item in listing.json() if item["key_id"] == created["key_id"])
    assert mine == {key: value for key, value in created.items() if key != "key"}
    assert mine["status"] == "active"


async def test_revocation_takes_effect_on_the_next_request(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    created = await make_key(api, "operator")
    headers = bearer(created["key"])
    assert (await anonymous.get(DEVICES, headers=headers)).status_code == 200
    assert (await api.delete(f"/api/v1/keys/{created['key_id']}")).status_code == 204
    assert (await anonymous.get(DEVICES, headers=headers)).status_code == 401
    again = await api.delete(f"/api/v1/keys/{created['key_id']}")
    assert again.status_code == 404
    listed = (await api.get("/api/v1/keys")).json()
    assert next(k for k in listed if k["key_id"] == created["key_id"])["status"] == "revoked"


async def test_an_expired_key_is_refused(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient, database: Database
) -> None:
    created = await make_key(api, "viewer", expires="2099-01-01T00:00:00Z")
    assert created["expires_at"].startswith("2099-01-01")
    headers = bearer(created["key"])
    assert (await anonymous.get(DEVICES, headers=headers)).status_code == 200
    async with database.transaction() as session:
        await session.execute(
            update(ApiKey)
            .where(ApiKey.key_id == created["key_id"])
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert (await anonymous.get(DEVICES, headers=headers)).status_code == 401
    past = await api.post(
        "/api/v1/keys", json={"name": "x", "role": "viewer", "expires": "2020-01-01T00:00:00Z"}
    )
    assert past.status_code == 400
    assert "in the past" in past.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "role": "root"},
        {"name": "", "role": "viewer"},
        {"name": "x", "role": "viewer", "extra": 1},
        {"name": "x", "role": "viewer", "expires": "tomorrow"},
    ],
)
async def test_bad_key_requests_are_4xx(api: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await api.post("/api/v1/keys", json=body)
    assert response.status_code in (400, 422), response.text


# --- audit log -----------------------------------------------------------------------------------


async def test_every_write_is_audited_with_who_what_and_outcome(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    operator = await make_key(api, "operator")
    viewer = await make_key(api, "viewer")
    await anonymous.post(DEVICES, json=DEVICE, headers=bearer(operator["key"]))
    await anonymous.patch(f"{DEVICES}/dev-1", json={"name": "N"}, headers=bearer(viewer["key"]))
    await anonymous.delete(f"{DEVICES}/dev-1")
    await anonymous.get(DEVICES, headers=bearer(viewer["key"]))  # a read: not audited

    entries = (await api.get("/api/v1/audit")).json()["items"]
    by_status = {entry["status"]: entry for entry in entries if entry["route"].startswith(DEVICES)}
    assert set(by_status) == {201, 403, 401}
    created = by_status[201]
    assert created["actor"] == f"key:{operator['key_id']} (operator key)"
    assert created["role"] == "operator"
    assert created["method"] == "POST"
    assert created["route"] == "/api/v1/devices"
    refused = by_status[403]
    assert refused["actor"].startswith(f"key:{viewer['key_id']}")
    assert refused["route"] == "/api/v1/devices/{device_id}"
    assert refused["target"] == "device_id=dev-1"
    assert by_status[401]["actor"] == "unauthenticated"
    assert by_status[401]["role"] is None
    key_entries = [entry for entry in entries if entry["route"] == "/api/v1/keys"]
    assert len(key_entries) == 2
    assert all(entry["status"] == 201 for entry in key_entries)
    assert operator["key"] not in (await api.get("/api/v1/audit")).text


# --- browser defences -----------------------------------------------------------------------------


async def test_security_headers_on_api_answers_and_pages(api: httpx.AsyncClient) -> None:
    for path in (DEVICES, "/health", "/api/v1/nothing-here"):
        response = await api.get(path)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
    docs = await api.get("/docs")
    assert "frame-ancestors 'none'" in docs.headers["content-security-policy"]


async def test_cors_stays_off_by_default(api: httpx.AsyncClient) -> None:
    preflight = await api.options(
        DEVICES,
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "DELETE"},
    )
    assert "access-control-allow-origin" not in preflight.headers


# --- JWT ---------------------------------------------------------------------------------------

SECRET = "a-shared-secret-of-thirty-two-bytes!"


@pytest.fixture
async def jwt_app(sqlite_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        sqlite_url,
        tmp_path,
        auth_jwt_secret=SECRET,
        auth_jwt_audience="iotmeter",
        auth_jwt_role_claim="groups",
        auth_jwt_roles={"iot-ops": "operator"},
    )
    app = create_app(settings)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://iotmeter") as client:
            yield client


def token(**claims: Any) -> str:
    key = claims.pop("_key", SECRET)
    base = {"sub": "alice", "aud": "iotmeter", "exp": int(time.time()) + 300}
    return jwt.encode({**base, **claims}, key, algorithm="HS256")


async def test_a_jwt_with_a_mapped_role_is_accepted(jwt_app: httpx.AsyncClient) -> None:
    response = await jwt_app.post(
        DEVICES, json=DEVICE, headers=bearer(token(groups=["staff", "iot-ops"]))
    )
    assert response.status_code == 201, response.text
    viewer = await jwt_app.post(
        DEVICES, json={**DEVICE, "id": "dev-2"}, headers=bearer(token(groups="viewer"))
    )
    assert viewer.status_code == 403


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        ({"exp": int(time.time()) - 3600}, 401),
        ({"aud": "someone-else"}, 401),
        ({"groups": ["staff"]}, 403),
        ({"_key": "another-secret-of-thirty-two-bytes!!"}, 401),
    ],
)
async def test_a_jwt_that_does_not_pass_is_refused(
    jwt_app: httpx.AsyncClient, claims: dict[str, Any], status: int
) -> None:
    claims.setdefault("groups", ["iot-ops"])
    response = await jwt_app.get(DEVICES, headers=bearer(token(**claims)))
    assert response.status_code == status, response.text


async def test_an_unsigned_jwt_is_refused(jwt_app: httpx.AsyncClient) -> None:
    unsigned = jwt.encode(
        {"sub": "x", "aud": "iotmeter", "exp": int(time.time()) + 60, "groups": ["iot-ops"]},
        None,
        algorithm="none",
    )
    assert (await jwt_app.get(DEVICES, headers=bearer(unsigned))).status_code == 401


# --- auth off, and the command line ----------------------------------------------------------


async def test_auth_off_serves_anyone_and_warns(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await empty_tables(sqlite_url)
    settings = make_settings(sqlite_url, tmp_path, auth="off")
    with caplog.at_level(logging.WARNING):
        async with LifespanManager(create_app(settings)) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
                assert (await client.post(DEVICES, json=DEVICE)).status_code == 201
    assert "IOTMETER_AUTH=off" in caplog.text
    assert not settings.auth_bootstrap_file.exists()


async def cli(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    """`iotmeter keys …` in a subprocess (the event loop, and the app on it, keep running)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTMETER_")}
    env["IOTMETER_DATABASE_URL"] = database_url
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "iotmeter", "keys", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_keys_from_the_command_line(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient, settings: Settings
) -> None:
    made = await cli(
        "create", "--name", "cli", "--role", "operator", database_url=settings.database_url
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    key_id = key.split("_")[1]
    assert "not shown again" in made.stderr
    assert (await anonymous.post(DEVICES, json=DEVICE, headers=bearer(key))).status_code == 201
    listed = await cli("list", database_url=settings.database_url)
    assert key_id in listed.stdout
    assert key not in listed.stdout
    revoked = await cli("revoke", key_id, database_url=settings.database_url)
    assert revoked.returncode == 0, revoked.stderr
    assert (await anonymous.get(DEVICES, headers=bearer(key))).status_code == 401
    unknown = await cli("revoke", "000000000000", database_url=settings.database_url)
    assert unknown.returncode == 1
    assert "no usable key" in unknown.stderr


# --- rate limits and OPTIONS ----------------------------------------------------------------


@pytest.fixture
async def limited(sqlite_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    await empty_tables(sqlite_url)
    settings = make_settings(
        sqlite_url, tmp_path, rate_limit_per_key="5/minute", rate_limit_per_address="8/minute"
    )
    async with LifespanManager(create_app(settings)) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://iotmeter") as client:
            client.headers.update(await auth_headers(settings))
            yield client


async def test_a_key_over_its_rate_limit_gets_429_with_retry_after(
    limited: httpx.AsyncClient,
) -> None:
    statuses = [(await limited.get(DEVICES)).status_code for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    refused = await limited.get(DEVICES)
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "IOTMETER_RATE_LIMIT_PER_KEY" in refused.json()["error"]["message"]


async def test_failed_attempts_count_against_the_address(limited: httpx.AsyncClient) -> None:
    statuses = [
        (await limited.get(DEVICES, headers=bearer("iotm_000000000000_" + "A" * 43))).status_code
        for _ in range(10)
    ]
    assert statuses == [401] * 8 + [429] * 2


async def test_options_names_every_method_of_the_resource(api: httpx.AsyncClient) -> None:
    response = await api.options("/api/v1/devices/dev-1")
    assert response.status_code == 204
    assert response.headers["allow"] == "DELETE, GET, HEAD, OPTIONS, PATCH"
    wrong = await api.put("/api/v1/devices/dev-1")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "DELETE, GET, HEAD, OPTIONS, PATCH"


async def test_rate_limits_in_redis_hold_across_processes(sqlite_url: str, tmp_path: Path) -> None:
    """Two app instances (as two processes would) share one key's budget through Redis (the
    one pre-started on 127.0.0.1:6379; a missing Redis fails this test)."""
    await empty_tables(sqlite_url)
    settings = make_settings(
        sqlite_url,
        tmp_path,
        rate_limit_per_key="6/minute",
        rate_limit_per_address="",
        rate_limit_storage="redis://127.0.0.1:6379/0",
    )
    async with (
        LifespanManager(create_app(settings)) as first,
        LifespanManager(create_app(settings)) as second,
    ):
        headers = await auth_headers(settings)  # a new key: its budget is untouched
        statuses = []
        for index in range(8):
            app = (first if index % 2 else second).app
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://iotmeter", headers=headers
            ) as client:
                statuses.append((await client.get(DEVICES)).status_code)
    assert statuses == [200] * 6 + [429] * 2


async def test_a_viewer_may_backtest_a_rule_but_not_change_one(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    """A backtest is a POST that writes nothing: a viewer (the dashboard's too) may run it."""
    assert (await api.post(DEVICES, json=DEVICE)).status_code == 201
    body = {
        "name": "hot",
        "kind": "threshold",
        "device_id": "dev-1",
        "field": "t",
        "operator": ">",
        "threshold": 30.0,
        "severity": "warning",
    }
    created = await api.post("/api/v1/alert-rules", json=body)
    assert created.status_code == 201, created.text
    rule = created.json()["id"]
    viewer = bearer((await make_key(api, "viewer"))["key"])
    ran = await anonymous.post(
        f"/api/v1/alert-rules/{rule}/backtest", params={"start": "-1h"}, headers=viewer
    )
    assert ran.status_code == 200, ran.text
    for method, path, payload in (
        ("POST", "/api/v1/alert-rules", body),
        ("PATCH", f"/api/v1/alert-rules/{rule}", {"threshold": 1.0}),
        ("DELETE", f"/api/v1/alert-rules/{rule}", None),
    ):
        refused = await anonymous.request(method, path, json=payload, headers=viewer)
        assert refused.status_code == 403, (method, path, refused.text)
    assert (await api.get(f"/api/v1/alert-rules/{rule}")).json()["threshold"] == 30.0
    # Only that path: a route added below it later is a write until someone says otherwise.
    assert needed_role("POST", f"/api/v1/alert-rules/{rule}/backtest/x") == Role.operator
    assert needed_role("POST", f"/api/v1/alert-rules/{rule}/backtestx") == Role.operator
