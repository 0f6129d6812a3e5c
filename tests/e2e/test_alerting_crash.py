"""Alerting through crashes (SIGKILL of a real `iotmeter serve` process, SQLite, Mosquitto):
a webhook in flight when the process dies is delivered after the restart with the same
`webhook-id` (at least once, never zero); a pending duration survives; no alert is doubled."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.e2e.test_ingest_e2e import publish
from tests.fixtures.delivery import AppProcess, app_environment
from tests.fixtures.receiver import webhook_receiver
from tests.fixtures.services import Mosquitto
from tests.fixtures.waiting import eventually


def at(device: str, ms: int, t: float) -> tuple[str, bytes]:
    return f"iot/{device}/telemetry", orjson.dumps({"ts": ms, "metrics": {"t": t}})


async def call(app: AppProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=app.base_url, headers=app.headers, timeout=10) as c:
        return await c.request(method, path, **kwargs)


async def rule_alerts(app: AppProcess) -> list[dict[str, Any]]:
    response = await call(app, "GET", "/api/v1/alerts", params={"limit": 100})
    if response.status_code != 200:
        return []
    return [alert for alert in response.json()["items"] if alert["rule_id"] is not None]


async def test_a_webhook_in_flight_at_a_sigkill_is_delivered_after_the_restart(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    workdir = tmp_path / "app"
    env = app_environment(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/iotmeter.db",
        mqtt_url=mosquitto.url,
        workdir=workdir,
        client_id="iotmeter-alert-crash",
        IOTMETER_WEBHOOK_ALLOW_PRIVATE="true",
        IOTMETER_BATCH_MAX_DELAY_S="0.05",
    )
    app = AppProcess(env, workdir)
    async with webhook_receiver() as receiver:
        receiver.hang_paths.add("/hook")
        try:
            await app.start("ready")
            made = await call(
                app,
                "POST",
                "/api/v1/channels",
                json={"name": "h", "kind": "webhook", "url": receiver.url()},
            )
            assert made.status_code == 201, made.text
            made = await call(
                app,
                "POST",
                "/api/v1/alert-rules",
                json={
                    "name": "hot",
                    "kind": "threshold",
                    "device_id": "k-1",
                    "field": "t",
                    "operator": ">",
                    "threshold": 30.0,
                },
            )
            assert made.status_code == 201, made.text
            publish(mosquitto.port, [at("k-1", int(time.time() * 1000), 40.0)])
            await eventually(
                lambda: asyncio.sleep(0, len(receiver.at("/hook"))),
                lambda count: count >= 1,
                what="the webhook in flight",
            )
            app.kill()  # while the receiver holds the request
            receiver.hang_paths.clear()
            await app.start("ready")
            await eventually(
                lambda: asyncio.sleep(0, len(receiver.at("/hook"))),
                lambda count: count >= 2,
                within=40,
                what="the webhook delivered again after the restart",
            )
            ids = {item.headers["webhook-id"] for item in receiver.at("/hook")}
            assert len(ids) == 1, ids  # the same event, so the receiver can drop a duplicate
            delivered = await eventually(
                lambda: call(app, "GET", "/api/v1/notifications", params={"status": "delivered"}),
                lambda r: r.json()["total"] == 1,
                what="the notification marked delivered",
            )
            assert delivered.json()["items"][0]["event_id"] in ids
            # Replaying the spool after the kill opened no second alert.
            assert len(await rule_alerts(app)) == 1
        finally:
            app.kill()


async def test_a_pending_duration_survives_a_sigkill(tmp_path: Path, mosquitto: Mosquitto) -> None:
    workdir = tmp_path / "app"
    env = app_environment(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/iotmeter.db",
        mqtt_url=mosquitto.url,
        workdir=workdir,
        client_id="iotmeter-pending-crash",
        IOTMETER_BATCH_MAX_DELAY_S="0.05",
    )
    app = AppProcess(env, workdir)
    base = int(time.time() * 1000) - 600_000
    try:
        await app.start("ready")
        made = await call(
            app,
            "POST",
            "/api/v1/alert-rules",
            json={
                "name": "slow",
                "kind": "threshold",
                "device_id": "p-1",
                "field": "t",
                "operator": ">",
                "threshold": 30.0,
                "duration_s": 60,
            },
        )
        assert made.status_code == 201, made.text
        publish(mosquitto.port, [at("p-1", base, 31.0), at("p-1", base + 30_000, 32.0)])
        await eventually(
            app.stats,
            lambda body: body is not None and body["spool"]["lag_by_sink"]["registry"] == 0,
            what="both readings taken",
        )
        states = await eventually(
            lambda: call(app, "GET", f"/api/v1/alert-rules/{made.json()['id']}/devices"),
            lambda r: r.status_code == 200 and r.json() and r.json()[0]["status"] == "pending",
            what="the rule pending for p-1",
        )
        assert states.json()[0]["pending_since"].startswith(
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(base / 1000))
        )
        await asyncio.sleep(0.5)
        app.kill()
        await app.start("ready")
        publish(mosquitto.port, [at("p-1", base + 60_000, 33.0)])
        alerts = await eventually(
            lambda: rule_alerts(app),
            lambda found: len(found) == 1,
            what="the alert fired 60 s after the first breach, across the crash",
        )
        assert alerts[0]["value"] == 33.0
        assert alerts[0]["breach_count"] == 3
    finally:
        app.kill()
